#!/usr/bin/env python
"""The reports of ``quality.py``: ``quality.md``'s two tables (one row per variant's best
setting with its seed mean and spread; every run) and ``quality.png`` (validation perplexity and
training loss vs tokens). Pure functions of a ``quality.json`` result: ``quality.py --replot``
redraws an old result with them."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from bench_common import fmt, markdown_table, try_plot


def losses_by_setting(
    result: dict[str, Any], field: str = "final_val_loss"
) -> dict[tuple, list[float]]:
    """(variant, lr, inactive_lr_scale) -> the ``field`` (final validation loss, or
    ``final_test_loss``) of its finished runs (one per seed); stopped, failed or skipped runs, and
    runs without the value, are left out."""
    out: dict[tuple, list[float]] = {}
    for r in result["runs"]:
        if r.get("status") == "ok" and r.get(field) is not None:
            key = (r["variant"], r["lr"], r.get("inactive_lr_scale"))
            out.setdefault(key, []).append(r[field])
    return out


def _scale(r: dict[str, Any]) -> str:
    return "-" if r.get("inactive_lr_scale") is None else f"{r['inactive_lr_scale']:g}"


def has_test(result: dict[str, Any]) -> bool:
    """Whether any run has a test loss (``--test-files``; older quality.json files have none)."""
    return any(r.get("final_test_loss") is not None for r in result["runs"])


def table(result: dict[str, Any]) -> str:
    runs = sorted(result["runs"], key=lambda r: (r.get("final_val_loss") is None,
                                                  r.get("final_val_loss") or 0))  # fmt: skip
    test = has_test(result)
    rows = [[r["variant"], f"{r['lr']:g}", _scale(r), str(r.get("seed", result["config"]["seed"])),
             r["status"], fmt(r.get("tokens"), ",d"),
             fmt(r.get("final_val_loss"), ".4f"), fmt(r.get("final_val_ppl"), ",.2f"),
             fmt(r.get("best_val_loss"), ".4f"),
             *([fmt(r.get("final_test_loss"), ".4f")] if test else []),
             fmt(r.get("final_train_loss"), ".4f"),
             fmt(r.get("opt_state_mib"), ",.1f"), fmt(r.get("tokens_per_s"), ",.0f"),
             fmt(r.get("wall_s"), ",.0f")] for r in runs]  # fmt: skip
    return markdown_table(["variant", "lr", "free lr scale", "seed", "status", "tokens",
                           "final val loss", "val ppl", "best val loss",
                           *(["test loss"] if test else []),
                           "train loss (last 5 logs)", "opt state MiB", "tokens/s", "wall s"],
                          rows)  # fmt: skip


def summary(result: dict[str, Any]) -> str:
    """One row per variant: its best setting (lowest mean final validation loss over seeds), the
    mean, the per-seed values and their spread (max - min), best first. With test losses
    (``has_test``): the mean final test loss of the same runs and its perplexity ("-" unless every
    run of the setting has one); the test loss plays no part in choosing the setting."""
    groups = losses_by_setting(result)
    tests = losses_by_setting(result, "final_test_loss") if has_test(result) else None
    best: dict[str, tuple] = {}
    for key, vals in groups.items():
        mean = sum(vals) / len(vals)
        if key[0] not in best or mean < best[key[0]][0]:
            best[key[0]] = (mean, key, vals)
    rows = []
    for v, (mean, key, vals) in sorted(best.items(), key=lambda kv: kv[1][0]):
        scale = "-" if key[2] is None else f"{key[2]:g}"
        spread = fmt(max(vals) - min(vals), ".4f") if len(vals) > 1 else "-"
        per_seed = ", ".join(f"{x:.4f}" for x in vals)
        row = [v, f"{key[1]:g}", scale, str(len(vals)), f"{mean:.4f}", f"{math.exp(mean):,.2f}"]
        if tests is not None:
            t = tests.get(key, [])
            t_mean = sum(t) / len(t) if t and len(t) == len(vals) else None
            row += [fmt(t_mean, ".4f"), fmt(None if t_mean is None else math.exp(t_mean), ",.2f")]
        rows.append(row + [per_seed, spread])
    test_cols = ["mean final test loss", "test ppl of mean"] if tests is not None else []
    return markdown_table(["variant", "best lr", "free lr scale", "seeds", "mean final val loss",
                           "ppl of mean", *test_cols, "per seed", "spread"], rows)  # fmt: skip


def plot(result: dict[str, Any], path: Path) -> None:
    runs = [r for r in result["runs"] if r.get("records")]
    if not runs:
        return

    def draw(plt):
        fig, ax = plt.subplots(1, 2, figsize=(14, 5))
        # one colour per variant; settings and seeds of a variant differ by line style
        order = list(dict.fromkeys(r["variant"] for r in runs))
        colours = {v: plt.get_cmap("tab10")(i % 10) for i, v in enumerate(order)}
        styles = ["-", "--", ":", "-."]
        seen: dict[str, int] = {}
        for r in runs:
            k = seen[r["variant"]] = seen.get(r["variant"], -1) + 1
            style = dict(color=colours[r["variant"]], linestyle=styles[k % len(styles)])
            vals = [x for x in r["records"] if x.get("val_loss") is not None]
            label = f"{r['variant']} lr={r['lr']:g} free={_scale(r)} seed={r.get('seed', '-')}"
            if vals:
                ax[0].plot([x["tokens"] for x in vals],
                           [math.exp(min(x["val_loss"], 50)) for x in vals], marker=".",
                           label=label, **style)  # fmt: skip
            train = [x for x in r["records"] if "loss" in x and "tokens" in x]
            ax[1].plot([x["tokens"] for x in train], [x["loss"] for x in train], label=label,
                       linewidth=1, **style)  # fmt: skip
        ax[0].set_ylabel("validation perplexity")
        ax[0].set_yscale("log")
        ax[1].set_ylabel("training loss")
        for a in ax:
            a.set_xlabel("tokens")
            a.grid(alpha=0.3)
        ax[1].legend(fontsize=7)
        cfg = result["config"]
        tps = result["tokens_per_step"]
        fig.suptitle(f"LLaMA-{cfg['model']}, {result['steps']} steps x {tps:,} tokens, "
                     f"data {cfg['data_source']}")  # fmt: skip

    try_plot(draw, path)
