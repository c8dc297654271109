"""The quality benchmark's sweep -> finals protocol (``benchmarks/quality.py``): which runs a grid
makes, and which setting ``--best-from`` picks. Pure functions; no training, no data."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def quality():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("quality_bench", ROOT / "benchmarks/quality.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _args(quality, *argv: str):
    return quality.parse_args(list(argv))


def test_grid_sweeps_the_state_free_scale_only_for_frugal(quality):
    args = _args(quality, "--variants", "adamw,frugal_block", "--lrs", "1e-3,3e-3",
                 "--inactive-lr-scales", "1,0.1", "--seeds", "0,1")  # fmt: skip
    got = quality.settings(args)
    assert len(got) == 2 * 2 + 2 * 2 * 2  # adamw: lr x seed; frugal: lr x scale x seed
    assert {s for v, _, s, _ in got if v == "adamw"} == {None}
    assert {s for v, _, s, _ in got if v == "frugal_block"} == {1.0, 0.1}
    runs = quality.plan_runs(args, steps=10)
    names = [r["name"] for r in runs]
    assert len(set(names)) == len(names)  # every run has its own output folder
    frugal = next(r for r in runs if r["variant"] == "frugal_block" and r["inactive_lr_scale"])
    assert frugal["optimizer"]["inactive_lr_scale"] == frugal["inactive_lr_scale"]
    assert "inactive_lr_scale" not in next(r for r in runs if r["variant"] == "adamw")["optimizer"]


def _sweep(runs: list[tuple]) -> dict:
    return {"runs": [{"variant": v, "lr": lr, "inactive_lr_scale": s, "status": st,
                      "final_val_loss": loss} for v, lr, s, st, loss in runs]}  # fmt: skip


def test_best_from_picks_lowest_mean_loss_and_ignores_unfinished_runs(quality, tmp_path):
    sweep = _sweep([
        ("adamw", 1e-3, None, "ok", 5.0), ("adamw", 3e-3, None, "ok", 5.2),
        ("frugal_block", 1e-3, 1.0, "ok", 5.1), ("frugal_block", 1e-3, 0.1, "ok", 4.9),
        ("frugal_block", 3e-3, 0.1, "stopped (budget)", 4.0),  # unfinished: never chosen
        ("frugal_block", 3e-3, 1.0, "ok", 4.8), ("frugal_block", 3e-3, 1.0, "ok", 5.2),  # mean 5.0
    ])  # fmt: skip
    path = tmp_path / "quality.json"
    path.write_text(json.dumps(sweep))
    best = quality.best_settings(sweep, ["adamw", "frugal_block"], str(path))
    assert best == {"adamw": (1e-3, None), "frugal_block": (1e-3, 0.1)}
    args = _args(quality, "--variants", "adamw,frugal_block", "--best-from", str(path),
                 "--seeds", "0,1")  # fmt: skip
    assert quality.settings(args) == [("adamw", 1e-3, None, 0), ("adamw", 1e-3, None, 1),
                                      ("frugal_block", 1e-3, 0.1, 0),
                                      ("frugal_block", 1e-3, 0.1, 1)]  # fmt: skip


def test_best_from_names_the_variant_without_a_finished_run(quality, tmp_path):
    sweep = _sweep([("adamw", 1e-3, None, "failed", None)])
    with pytest.raises(SystemExit, match="'adamw' has no finished run"):
        quality.best_settings(sweep, ["adamw"], "sweep.json")


@pytest.mark.parametrize("flag,value", [("--lrs", "1e-3,x"), ("--seeds", "0,one"),
                                        ("--inactive-lr-scales", "fast"),
                                        ("--best-from", "/nonexistent/quality.json")])  # fmt: skip
def test_bad_flags_name_themselves(quality, flag, value, capsys):
    with pytest.raises(SystemExit):
        _args(quality, flag, value)
    assert flag in capsys.readouterr().err


def test_summary_reports_mean_and_spread_over_seeds(quality):
    result = _sweep([("adamw", 1e-3, None, "ok", 4.0), ("adamw", 1e-3, None, "ok", 4.2)])
    line = next(x for x in quality.summary(result).splitlines() if x.startswith("| adamw"))
    assert "4.1000" in line and "0.2000" in line and "4.0000, 4.2000" in line


def test_rso_screens_change_one_option_each_and_stay_out_of_the_default_list(quality):
    import quality_variants  # on sys.path since the fixture (benchmarks/)

    assert not set(quality_variants.RSO_SCREENS) & set(quality.DEFAULT_VARIANTS)
    args = _args(quality, "--variants", ",".join(("rso", *quality_variants.RSO_SCREENS)),
                 "--update-gap", "200")  # fmt: skip
    opts = {r["variant"]: r["optimizer"] for r in quality.plan_runs(args, steps=10)}
    base = opts.pop("rso")
    assert base["inner_steps"] == 200  # --update-gap
    assert opts["rso_inner50"]["inner_steps"] == 50  # the variant's own, not --update-gap
    for v, o in opts.items():
        changed = {k for k in o.keys() | base.keys() if o.get(k) != base.get(k)}
        assert 1 <= len(changed) <= 2, (v, changed)  # *_lr2x / *_keep combine two


def test_decay_variant_decays_over_the_run_and_builds(quality):
    """``frugal_projection_decay``: density 0.25 -> 0.05 with density_decay_steps = the run's
    steps, a valid optimizer section the train loop builds (and steps), off the default list."""
    import torch

    from frugal_dist.train.config_validation import validate_optimizer_section
    from frugal_dist.train.optimizers import build_optimizer

    assert "frugal_projection_decay" not in quality.DEFAULT_VARIANTS
    args = _args(quality, "--variants", "frugal_projection_decay", "--update-gap", "2")
    (run,) = quality.plan_runs(args, steps=6)
    opt = run["optimizer"]
    assert (opt["density"], opt["density_final"], opt["density_decay_steps"]) == (0.25, 0.05, 6)
    validate_optimizer_section(opt)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 16))
    kw = {k: v for k, v in opt.items() if k != "name"}
    optimizer = build_optimizer(model, opt["name"], **kw)
    ranks = []
    for _ in range(6):
        model(torch.randn(4, 16)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        ranks.append(optimizer.state[model[0].weight]["exp_avg"].shape[1])
    assert ranks == [4, 4, 3, 3, 2, 2]  # round(16 rho): rho 0.25, 0.1833, 0.1167


def _runs_with_test(test: list) -> dict:
    result = _sweep([("adamw", 1e-3, None, "ok", 4.0), ("adamw", 1e-3, None, "ok", 4.2),
                     ("galore", 1e-3, None, "ok", 4.5)])  # fmt: skip
    for r, (seed, t) in zip(result["runs"], enumerate(test)):
        r.update(seed=seed, final_test_loss=t)
    result["config"] = {"seed": 0}
    return result


def test_tables_without_test_losses_keep_their_columns(quality, tmp_path, capsys):
    """An older quality.json (no final_test_loss key at all) renders as before (--replot)."""
    result = _runs_with_test([None, None, None])
    for r in result["runs"]:
        del r["final_test_loss"]
    assert "test" not in quality.summary(result) + quality.table(result)
    path = tmp_path / "quality.json"
    path.write_text(json.dumps(result))
    quality.main(["--replot", str(path)])
    out = "\n".join(x for x in capsys.readouterr().out.splitlines() if x.startswith("|"))
    assert "| mean final val loss | ppl of mean | per seed | spread |" in out
    assert "| best val loss | train loss (last 5 logs) |" in out and "test" not in out


def test_tables_with_test_losses(quality):
    result = _runs_with_test([4.1, 4.3, None])  # galore's run has no test loss
    summary = quality.summary(result).splitlines()
    assert "| mean final test loss | test ppl of mean |" in summary[0]
    cols = [c.strip() for c in summary[0].strip("|").split("|")]
    adamw = [c.strip() for c in next(x for x in summary if x.startswith("| adamw")).strip("|")
             .split("|")]  # fmt: skip
    row = dict(zip(cols, adamw))
    assert row["mean final val loss"] == "4.1000" and row["mean final test loss"] == "4.2000"
    assert row["test ppl of mean"] == f"{math.exp(4.2):,.2f}" and row["spread"] == "0.2000"
    galore = dict(zip(cols, [c.strip() for c in next(x for x in summary if x.startswith(
        "| galore")).strip("|").split("|")]))  # fmt: skip
    assert galore["mean final test loss"] == "-" and galore["test ppl of mean"] == "-"
    table = quality.table(result).splitlines()
    cols = [c.strip() for c in table[0].strip("|").split("|")]
    assert "test loss" in cols
    tests = sorted(row.split("|")[cols.index("test loss") + 1].strip() for row in table[2:])
    assert tests == ["-", "4.1000", "4.3000"]


def test_test_files_flag_reaches_every_run_and_collect_reads_it(quality, tmp_path):
    args = _args(quality, "--variants", "adamw", "--test-files", "t/*.jsonl",
                 "--cache-dir", str(tmp_path))  # fmt: skip
    data = quality.data_section(args)
    assert data["test_files"] == "t/*.jsonl"
    (run,) = quality.plan_runs(args, steps=3)
    assert "--data.test_files=t/*.jsonl" in quality.command(args, run, data, 3, tmp_path)
    no_test = quality.data_section(_args(quality, "--cache-dir", str(tmp_path)))
    assert "test_files" not in no_test
    rdir = tmp_path / "runs" / run["name"]
    rdir.mkdir(parents=True)
    records = [{"step": 3, "tokens": 9, "loss": 5.0, "val_loss": 4.5, "test_loss": 4.25}]
    (rdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    run["status"] = "ok"
    quality.collect(run, tmp_path)
    assert run["final_test_loss"] == 4.25 and run["final_test_ppl"] == pytest.approx(math.exp(4.25))
    with pytest.raises(SystemExit):
        _args(quality, "--data-source", "embedded", "--test-files", "t/*.jsonl")


def test_adaptive_refresh_variant_builds_and_feeds_the_loss(quality):
    """``frugal_projection_adaT``: svd rho 0.25 with refresh_policy="loss", a valid optimizer
    section the train loop builds, off the default list; stepped with a flat loss, T doubles
    from --update-gap up to 8 x --update-gap."""
    import torch

    from frugal_dist.train.config_validation import validate_optimizer_section
    from frugal_dist.train.optimizers import build_optimizer

    assert "frugal_projection_adaT" not in quality.DEFAULT_VARIANTS
    args = _args(quality, "--variants", "frugal_projection_adaT", "--update-gap", "2")
    (run,) = quality.plan_runs(args, steps=40)
    opt = run["optimizer"]
    assert (opt["subspace"], opt["proj_type"], opt["density"]) == ("projection", "svd", 0.25)
    assert (opt["refresh_policy"], opt["refresh_threshold"], opt["update_gap"]) == ("loss", 0.02, 2)
    validate_optimizer_section(opt)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 16))
    kw = {k: v for k, v in opt.items() if k != "name"}
    optimizer = build_optimizer(model, opt["name"], **kw)
    gaps = []
    for _ in range(40):
        model(torch.randn(4, 16)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        optimizer.observe_loss(1.0)  # no progress: every decision doubles T
        gaps.append(int(optimizer.state[model[0].weight]["refresh_gap"].item()))
    assert sorted(set(gaps)) == [2, 4, 8, 16]


def test_swan_variant_is_rho0_swan_off_the_default_list_and_builds(quality):
    """``frugal_d0_swan``: frugal_d0 with state_free="swan" (one option changed), a valid
    optimizer section the train loop builds and steps, off the default list."""
    import torch

    from frugal_dist.train.config_validation import validate_optimizer_section
    from frugal_dist.train.optimizers import build_optimizer

    assert "frugal_d0_swan" not in quality.DEFAULT_VARIANTS
    args = _args(quality, "--variants", "frugal_d0,frugal_d0_swan", "--update-gap", "2")
    opts = {r["variant"]: r["optimizer"] for r in quality.plan_runs(args, steps=4)}
    base, swan = opts["frugal_d0"], opts["frugal_d0_swan"]
    assert {k for k in base.keys() | swan.keys() if base.get(k) != swan.get(k)} == {"state_free"}
    assert (swan["state_free"], swan["density"]) == ("swan", 0.0)
    validate_optimizer_section(swan)
    model = torch.nn.Sequential(torch.nn.Linear(16, 12), torch.nn.Linear(12, 16))
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = build_optimizer(model, swan["name"], **{k: v for k, v in swan.items()
                                                         if k != "name"})  # fmt: skip
    for _ in range(4):
        model(torch.randn(4, 16)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
