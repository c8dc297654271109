"""Shared plumbing of the GPU benchmarks (``gpu_memory_speed.py``, ``comm_bench.py``,
``quality.py``): provenance (hardware, versions, git sha, command line), JSON output, optional
plotting, memory cleanup between variants, a wall-clock budget and the device's copy bandwidth.

Nothing here measures an optimizer; it only records where and how a measurement was taken.
"""

from __future__ import annotations

import datetime as _dt
import gc
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the checkout this file lives in, when frugal_dist is not installed
    sys.path.append(str(REPO))

ENV_KEYS = ("CUDA_VISIBLE_DEVICES", "NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST",
            "NVSHMEM_DISABLE_NVLS", "OMP_NUM_THREADS", "WORLD_SIZE", "PYTORCH_CUDA_ALLOC_CONF",
            "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE")  # fmt: skip


MANIFEST = Path(".gpu") / "manifest.json"  # written by ``stage_manifest.py`` before a GPU call


def sources_sha256(root: Path) -> str:
    """sha256 over the package sources under ``root/frugal_dist`` (``*.py`` and the ``*.json``
    data the package reads, such as the kernels' tile tables), path and bytes of each file."""
    import hashlib

    h = hashlib.sha256()
    pkg = root / "frugal_dist"
    for f in sorted([*pkg.rglob("*.py"), *pkg.rglob("*.json")]):
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def git_info(root: Path) -> dict[str, Any]:
    """Commit of the checkout at ``root`` and whether its ``frugal_dist/`` has uncommitted edits,
    plus ``frugal_dist_sources_sha256``, which identifies the code either way.

    A copied working tree (a GPU machine's) may carry stale git metadata. Where
    ``root/.gpu/manifest.json`` exists (``stage_manifest.py``: the commit and sources sha256 of
    a clean checkout, written before the copy), and the sources here hash to the manifest's
    sha256, the code *is* that commit's: ``commit`` is the manifest's, ``frugal_dist_dirty``
    False and ``commit_verified_by`` says so. A manifest whose sha256 differs is recorded under
    ``manifest_mismatch`` and git's own answer stands."""
    out: dict[str, Any] = {"commit": None, "frugal_dist_dirty": None,
                           "frugal_dist_sources_sha256": sources_sha256(root)}  # fmt: skip
    try:
        git = ["git", "-C", str(root)]
        run = dict(capture_output=True, text=True, check=True, timeout=10)
        out["commit"] = subprocess.run([*git, "rev-parse", "HEAD"], **run).stdout.strip()
        dirty = subprocess.run([*git, "status", "--porcelain", "--", "frugal_dist"], **run).stdout
        out["frugal_dist_dirty"] = bool(dirty.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    manifest = root / MANIFEST
    if manifest.is_file():
        staged = json.loads(manifest.read_text())
        if staged.get("frugal_dist_sources_sha256") == out["frugal_dist_sources_sha256"]:
            if out["commit"] != staged["commit"] or out["frugal_dist_dirty"] is not False:
                out["git_reported"] = {"commit": out["commit"], "dirty": out["frugal_dist_dirty"]}
            out["commit"], out["frugal_dist_dirty"] = staged["commit"], False
            out["commit_verified_by"] = (
                f"frugal_dist sources sha256 equal to {MANIFEST}, staged from a clean checkout "
                f"of {staged['commit']}"
            )
        else:
            out["manifest_mismatch"] = staged
    return out


def versions() -> dict[str, Any]:
    """Python, torch, CUDA/NCCL, DeepSpeed (if importable) and frugal_dist versions."""
    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "cuda": torch.version.cuda}  # fmt: skip
    try:
        info["nccl"] = (
            ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None
        )
    except Exception:  # noqa: BLE001 - a build without NCCL
        info["nccl"] = None
    try:
        import deepspeed

        info["deepspeed"] = deepspeed.__version__
    except Exception:  # noqa: BLE001 - deepspeed absent or broken: recorded, not fatal
        info["deepspeed"] = None
    try:
        import frugal_dist

        info["frugal_dist"] = frugal_dist.__version__
        pkg = Path(frugal_dist.__file__).resolve().parent
        info["frugal_dist_path"] = str(pkg)
        info["git"] = git_info(pkg.parent)
    except ImportError:
        info["frugal_dist"] = None
    return info


def _driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True)  # fmt: skip
        return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def hardware() -> dict[str, Any]:
    """GPU name / count / memory / driver, or the CPU model when there is no GPU."""
    info: dict[str, Any] = {"platform": platform.platform(), "cpu_count": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as fh:
            info["cpu_model"] = next(
                (ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), None
            )
    except OSError:
        info["cpu_model"] = platform.processor() or None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        info.update(gpu_name=props.name, gpu_count=torch.cuda.device_count(),
                    gpu_memory_bytes=props.total_memory, driver=_driver_version())  # fmt: skip
    else:
        info.update(gpu_name=None, gpu_count=0, driver=None)
    return info


def provenance() -> dict[str, Any]:
    """Everything a result file needs to be reproduced: command, date, hardware, versions, env."""
    return {
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
        "argv": list(sys.argv),
        "cwd": os.getcwd(),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "hardware": hardware(),
        "versions": versions(),
        "env": {k: os.environ[k] for k in ENV_KEYS if k in os.environ},
    }


def write_json(path: str | Path, obj: dict[str, Any]) -> None:
    """Write atomically (a partial file never replaces a complete one mid-write)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def try_plot(draw: Callable[[Any], None], path: str | Path) -> bool:
    """``draw(plt)`` then save to ``path``; False (with a message) when matplotlib is missing.
    The GPU image has no matplotlib: redraw there-made JSON here with ``--replot JSON``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no {path} (redraw later with --replot <json>)")
        return False
    draw(plt)
    plt.savefig(path, dpi=120, bbox_inches="tight")
    plt.close("all")
    print(f"wrote {path}")
    return True


def free_memory() -> None:
    """Drop garbage and cached CUDA blocks, reset the peak counter (between variants)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def is_oom(exc: BaseException) -> bool:
    """CUDA out-of-memory (also when wrapped by DeepSpeed or NCCL in a RuntimeError)."""
    oom_type = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    return isinstance(exc, oom_type) or "out of memory" in str(exc).lower()


class Budget:
    """A wall-clock budget: ``share(k)`` is the remaining time split over ``k`` pending items."""

    def __init__(self, seconds: float | None) -> None:
        self.start = time.monotonic()
        self.seconds = seconds

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def remaining(self) -> float:
        return float("inf") if self.seconds is None else self.seconds - self.elapsed()

    def share(self, pending: int) -> float:
        return self.remaining() / max(1, pending)


def copy_bandwidth(device: torch.device, nbytes: int | None = None, reps: int = 10) -> float:
    """Bytes/s of a large device-to-device copy, counting read + write (2 x size per copy).
    CUDA: 1 GiB buffers timed with events; CPU: 256 MiB with ``perf_counter``."""
    if nbytes is None:
        nbytes = 2**30 if device.type == "cuda" else 2**28
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0.record()
        for _ in range(reps):
            dst.copy_(src)
        t1.record()
        torch.cuda.synchronize(device)
        seconds = t0.elapsed_time(t1) / 1e3
    else:
        t = time.perf_counter()
        for _ in range(reps):
            dst.copy_(src)
        seconds = time.perf_counter() - t
    del src, dst
    free_memory()
    return 2 * nbytes * reps / seconds


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(x: Any, spec: str = ",.1f") -> str:
    """``x`` formatted, or the string itself ("oom", "-") when it is not a number."""
    return format(x, spec) if isinstance(x, (int, float)) else ("-" if x is None else str(x))


def frugal_device_options() -> dict[str, Any]:
    """FRUGAL options that only change where refresh-time work runs, not what a step computes:
    on CUDA, random projection bases are QR-factorised on the GPU (``proj_qr_device="param"``)
    when this checkout's FRUGAL has the option. Refreshes are never timed by the benchmarks; this
    only shortens their wall time (a 1B model's 168 float64 CPU QRs take seconds)."""
    import inspect

    from frugal_dist import FRUGAL

    if torch.cuda.is_available() and "proj_qr_device" in inspect.signature(FRUGAL).parameters:
        return {"proj_qr_device": "param"}
    return {}
