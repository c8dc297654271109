"""The tile sweep's table logic (``benchmarks/kernels_projection_tiles.py``): which candidate
each key gets, the merge into the existing table, the oracle gate and the skip reasons. Pure
functions on synthetic rows; nothing is measured."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from tests.triton_marks import needs_interpreter

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def sweep():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    path = ROOT / "benchmarks/kernels_projection_tiles.py"
    spec = importlib.util.spec_from_file_location("tiles_sweep", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(tile, ms_per_group, **kw):
    shapes = [([2048, 2048], "right"), ([5461, 2048], "right"), ([2048, 5461], "left")]
    groups = [{"shape": s, "side": side, "ms": ms} for (s, side), ms in zip(shapes, ms_per_group)]
    return {"kind": "apply", "precision": "bf16", "tile": list(tile), "groups": groups,
            "ms": sum(ms_per_group), **kw}  # fmt: skip


def test_write_tiles_picks_per_key_and_keeps_unmeasured_entries(sweep, tmp_path):
    base = {"measured": {"gpu": "old"}, "apply": {"bf16": [64, 64, 64, 4, 4, 1],
                                                  "tf32": [64, 256, 32, 8, 3, 1]},
            "down": {"bf16": [128, 256, 64, 8, 3]}, "down_backend": {"bf16": "triton"},
            "ms": {"apply.bf16": 8.95, "down.bf16": 4.19}}  # fmt: skip
    v = (64, 128, 64, 8, 3, 0, "grouped+early")
    res = {"provenance": {"command": "x", "date_utc": "now", "hardware": {"gpu_name": "H200"}},
           "rows": [_row((64, 64, 64, 4, 4, 1), [2.8, 3.9, 2.2]),
                    _row(v, [2.0, 4.0, 2.1]),
                    {"kind": "apply", "precision": "bf16", "tile": [1, 1, 1, 1, 1, 0, "tma"],
                     "groups": [], "error": "check failed"},
                    {"kind": "apply", "precision": "bf16", "tile": [2, 2, 2, 2, 2, 0, "tma"],
                     "groups": [], "skipped": "time cap"}]}  # fmt: skip
    out = tmp_path / "t.json"
    sweep.write_tiles(str(out), res, base)
    t = json.loads(out.read_text())
    assert t["apply"]["bf16.2048x2048"] == list(v) and t["apply"]["bf16.2048x5461"] == list(v)
    assert t["apply"]["bf16.5461x2048"] == [64, 64, 64, 4, 4, 1]
    assert t["apply"]["bf16"] == list(v)  # 8.1 ms against 8.9 ms over the model
    assert t["apply"]["bf16.right"] == list(v)  # 6.0 ms against 6.7 ms over the right groups
    assert t["ms"]["apply.bf16.right"] == pytest.approx(6.0)
    assert t["apply"]["tf32"] == base["apply"]["tf32"] and t["down"] == base["down"]
    assert t["down_backend"] == {"bf16": "triton"} and t["ms"]["down.bf16"] == 4.19
    assert t["measured"]["gpu"] == "H200" and t["measured"]["merged_into"] == {"gpu": "old"}
    pt = pytest.importorskip("frugal_dist.kernels.projection_triton")
    assert pt.load_tiles(out)[0]["apply"]["bf16"] == v  # the written table loads


def test_check_gate_and_skip_reasons(sweep, monkeypatch):
    assert sweep.check_failure({"flip_frac": 6e-4, "max_err_smooth": 6e-3}) is None
    assert "flip_frac" in sweep.check_failure({"flip_frac": 0.3, "max_err_smooth": 6e-3})
    assert "max_err_smooth" in sweep.check_failure({"flip_frac": 0.0, "max_err_smooth": 9.0})
    assert "rel_err" in sweep.check_failure({"rel_err": float("nan")})
    assert "time cap" in sweep.skip_reason("apply", (64, 64, 64, 4, 4, 1), 200.0, 170.0)
    v2 = pytest.importorskip("frugal_dist.kernels.projection_apply_v2")
    assert sweep.skip_reason("apply", (64, 64, 64, 4, 4, 0, "grouped+tma"), 1.0, 170.0) is None
    monkeypatch.setattr(v2, "TensorDescriptor", None)
    why = sweep.skip_reason("apply", (64, 64, 64, 4, 4, 0, "grouped+tma"), 1.0, 170.0)
    assert "tensor_descriptor" in why
    assert sweep.skip_reason("apply", (64, 64, 64, 4, 4, 0, "grouped+early"), 1.0, 0.0) is None


def test_v2_candidates_start_with_the_current_table(sweep):
    pt = pytest.importorskip("frugal_dist.kernels.projection_triton")
    got = sweep.candidates("bf16", apply_v2=True, down_v2=True)
    assert [kind for kind, _ in got] == ["apply", "down"]
    for (kind, tiles), new in zip(got, (sweep.APPLY_V2, sweep.DOWN_V2), strict=True):
        now = {tuple(t) for k, t in pt.TILES[kind].items() if k.split(".")[0] == "bf16"}
        assert set(tiles[: len(now)]) == now
        assert tiles[len(now) :] == [t for t in new["bf16"] if t not in now]
    assert [k for k, _ in sweep.candidates("bf16", apply_v2=False, down_v2=True)] == ["down"]
    for t in sweep.APPLY_V2["bf16"] + sweep.APPLY_V2["tf32"]:
        assert pt._tile_ok("apply", t) and pt.tile_variant(t) is not None
    for t in sweep.DOWN_V2["bf16"] + sweep.DOWN_V2["tf32"]:
        assert pt._tile_ok("down", t)


@needs_interpreter
@pytest.mark.parametrize("kind,tile", [("apply", (32, 32, 16, 4, 1, 0, "grouped+early+tma")),
                                       ("apply", (32, 32, 16, 4, 1, 1)),
                                       ("down", (32, 32, 16, 4, 1, "aligned"))])  # fmt: skip
def test_measure_checks_and_times_every_group(sweep, monkeypatch, kind, tile):
    """The sweep's per-candidate path on CPU tensors (fp32; the interpreter's bf16 dot is not
    usable): operands, the float64 check (within ``CHECK_LIMITS``) and one timed call per
    group (the CUDA-event timer replaced by a call counter)."""
    from frugal_dist.kernels.refresh import random_bases

    calls = []
    monkeypatch.setattr(sweep, "median_ms", lambda fn, reps: calls.append(fn()) or 1.0)
    gen = torch.Generator().manual_seed(0)
    gs = []
    for (m, n), side in (((70, 40), "right"), ((40, 70), "left")):
        dim, count, r = (n if side == "right" else m), 3, 20
        gs.append({"shape": (m, n), "side": side, "r": r, "count": count,
                   "W": [torch.randn(m, n, generator=gen) for _ in range(count)],
                   "G": [torch.randn(m, n, generator=gen) for _ in range(count)],
                   "P": random_bases(dim, r, list(range(count)), "cpu"),
                   "U": torch.randn((count, m, r) if side == "right" else (count, r, n),
                                    generator=gen)})  # fmt: skip
    row = sweep.measure(kind, tile, gs, "fp32", reps=1)
    assert len(calls) == 2 and row["ms"] == 2.0 and row["tile"] == list(tile)
    for g in row["groups"]:
        assert sweep.check_failure({k: v for k, v in g.items() if k in sweep.CHECK_LIMITS}) is None
        assert g.get("tma_ran") is ("tma" in str(tile[-1]) or None)  # descriptors were made
