"""Compiling a Triton kernel for sm_90 on a machine without a GPU (``triton.compile`` to PTX with
the bundled ptxas), for the ``*_compile.py`` tests: they check what the CPU interpreter does not
see -- that the compiled language accepts a kernel, and what its PTX does (vector widths,
atomics). Such a test module calls ``require_compiler()`` at import: it is skipped where triton
or its NVIDIA backend is missing or the interpreter is on (``TRITON_INTERPRET=1``)."""

from __future__ import annotations

import os
from typing import Any

import pytest

ALIGNED = [["tt.divisibility", 16]]  # the attribute Triton's launcher sets on 16-byte values


def require_compiler() -> Any:
    """The ``triton`` module, or a module-level skip (no triton, the interpreter is on, or a
    triton without ``ASTSource`` / ``GPUTarget``)."""
    triton = pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the interpreter replaces compiled kernels", allow_module_level=True)
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError:  # pragma: no cover - another triton layout
        pytest.skip("triton without ASTSource / GPUTarget", allow_module_level=True)
    return triton


def ptx_sm90(
    fn: Any, signature: dict, constexprs: dict, attrs: dict | None = None, num_warps: int = 4
) -> str:
    """PTX of ``fn`` specialised by ``signature`` (name -> type or "constexpr"), ``constexprs``
    and ``attrs`` ({(arg index,): [[attribute, value]]}), compiled for sm_90; skips the test when
    this machine has no ptxas for the target."""
    triton = require_compiler()
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn, signature, constexprs, attrs or {})
    try:
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                options={"num_warps": num_warps})  # fmt: skip
    except RuntimeError as exc:  # no ptxas / backend for the target on this machine
        if "ptxas" in str(exc).lower():
            pytest.skip(f"no ptxas: {exc}")
        raise
    return kernel.asm["ptx"]
