"""benchmarks/comm_model.py: the least-squares fit recovers known parameters from synthetic
runs built with them, and refuses to fit what the runs cannot determine."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import comm_model  # noqa: E402

TRUE = {"c[ddp]": 0.5, "c[two_level]": 1.2, "c[exact]": 2.0, "c[sign]": 6.0,
        "c[hierarchical]": 7.5, "1/B[nccl]": 8e-6 / 400, "1/B[gloo]": 8e-6 / 10,
        "v": 3e-6}  # fmt: skip
GRAD = 400e6  # full-gradient wire bytes per rank
SUBSPACES = {"a": 0.30, "b": 0.12, "c": 0.05, "d": 0.20}  # fraction of GRAD sent exactly


def _row(variant: str, wire: dict[str, float], sign: float, transports: dict[str, str],
         local: float | None) -> dict:  # fmt: skip
    fam = comm_model.family(variant)
    comm = TRUE[f"c[{fam}]"] + TRUE["v"] * sign
    comm += sum(TRUE[f"1/B[{transports[g]}]"] * b for g, b in wire.items())
    row = {"variant": variant, "status": "ok", "link_wire": wire,
           "payload_bytes": {"sign_allgather": sign} if sign else {"grad_full": 1},
           "step_ms_median": (local or 0.0) + comm}  # fmt: skip
    if local is not None:
        row["local_step_ms_median"] = local
    return row


def _run(inter: str, subspaces=SUBSPACES) -> dict:
    links = {"setting": "default", "world": "nccl", "intra": "nccl", "inter": inter}
    tr = {g: links[g] for g in ("world", "intra", "inter")}
    rows = [
        _row("ddp_allreduce", {"world": GRAD}, 0, tr, None),
        _row("two_level_allreduce", {"intra": GRAD, "inter": GRAD / 4}, 0, tr, None),
    ]
    for i, (sub, frac) in enumerate(subspaces.items()):
        local = 10.0 + i
        sign = (1 - frac) * GRAD / 64  # 1 bit per 4-byte entry, all-gathered from 2 ranks
        rows.append(_row(f"frugal_{sub}_exact", {"world": GRAD}, 0, tr, local))
        rows.append(_row(f"frugal_{sub}_sign", {"world": frac * GRAD + sign}, sign, tr, local))
        rows.append(_row(f"frugal_{sub}_hierarchical",
                         {"intra": GRAD + sign, "inter": (frac * GRAD + sign) / 2}, sign, tr,
                         local))  # fmt: skip
    return {"links": links, "rows": rows, "_path": f"synthetic_{inter}"}


def test_fit_recovers_known_parameters_and_the_crossover():
    obs = comm_model.observations([_run("nccl"), _run("gloo")])
    model = comm_model.fit(obs)
    for name, value in TRUE.items():
        assert model["params"][name] == pytest.approx(value, rel=1e-6, abs=1e-9), name
    assert model["rms_ms"] < 1e-6
    assert model["bandwidth_gbps"]["gloo"] == pytest.approx(10.0, rel=1e-6)
    gbps = np.geomspace(1, 400, 200)
    curves = comm_model.predict(model, obs, "a", gbps)
    # exact: local + c + GRAD x 8e-6 / B; sign: local + c + v s + (0.3 GRAD + s) x 8e-6 / B
    s = 0.7 * GRAD / 64
    exact = 10.0 + 2.0 + GRAD * 8e-6 / gbps
    assert np.allclose(curves["exact"], exact, rtol=1e-6)
    sign = 10.0 + 6.0 + 3e-6 * s + (0.3 * GRAD + s) * 8e-6 / gbps
    assert np.allclose(curves["sign"], sign, rtol=1e-6)
    # crossover where 2 + GRAD k / B = 6 + v s + (0.3 GRAD + s) k / B, k = 8e-6
    k = 8e-6
    expect = (GRAD - 0.3 * GRAD - s) * k / (6.0 + 3e-6 * s - 2.0)
    got = comm_model.crossovers(curves, gbps)["sign"]
    step = gbps[1] / gbps[0]
    assert expect / step <= got <= expect * step


def test_refuses_too_few_points():
    obs = comm_model.observations([_run("gloo", {"a": 0.3})])
    with pytest.raises(ValueError, match="too few points to fit: 5 rows for 8 parameters"):
        comm_model.fit(obs)


def test_refuses_parameters_the_runs_do_not_determine():
    run = _run("nccl")
    run["rows"] = [r for r in run["rows"] if r["variant"].endswith("_exact")]  # same bytes each
    with pytest.raises(ValueError, match=r"do not determine.*c\[exact\].*1/B\[nccl\]"):
        comm_model.fit(comm_model.observations([run, dict(run, _path="again")]))


def test_runs_without_links_record_are_refused():
    with pytest.raises(ValueError, match="no 'links' record.*rerun"):
        comm_model.observations([{"rows": [], "_path": "old.json"}])
