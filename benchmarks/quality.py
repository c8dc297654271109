#!/usr/bin/env python
"""Quality runs: every optimizer trained on the same tokens, in parallel, one process per slot.

    python benchmarks/quality.py --gpus 0,1 --jobs-per-gpu 4 --total-tokens 10000000 \\
        --max-seconds 480

Orchestrates ``launchers/train.py`` subprocesses (LLaMA-60M on enwiki by default): one run per
(variant, lr) pair, all with the same model, data order (seed), batch, sequence length, number of
steps, warm-up and cosine schedule, so every run sees exactly ``--total-tokens`` tokens (rounded
down to whole steps). The optimizer settings are those of ``configs/presets/*.yaml`` (the
papers': rho 0.25, update gap 200, lr 1e-3 for 60M). Variants (``--variants``): the table in
``quality_variants.py``, whose docstring says what each one measures.

Sweep and finals (issue: short runs are dominated by hyper-parameters): ``--lrs`` x
``--inactive-lr-scales`` (the FRUGAL state-free lr scale s_i; FRUGAL variants only) x ``--seeds``
is a grid; ``--best-from SWEEP/quality.json`` instead runs each variant's best (lr, s_i) of that
sweep (lowest final validation loss) once per ``--seeds``. ``quality.md`` starts with one row per
variant (best setting, mean over seeds, per-seed values, spread), then lists every run.

Test split (issue 19's protocol): ``--test-files GLOB`` is passed to every run as
``--data.test_files`` (``files`` source only); each run then evaluates the test split once after
its last step (``eval_batches`` batches, the validation batch shape) and its last ``metrics.jsonl``
record carries ``test_loss`` / ``test_ppl``. A run's summary gets ``final_test_loss`` /
``final_test_ppl``; ``quality.md``'s per-variant table gains ``mean final test loss`` and ``test
ppl of mean`` (over the same seeds as the validation mean; "-" unless every one has a test loss)
and the every-run table a ``test loss`` column -- only when some run has a test loss, so older
quality.json files (``--replot``) render as before. Settings are chosen on the validation loss
only (``--best-from`` and the per-variant best); the test loss never selects anything.

Steps: (1) the data (train, validation and ``--test-files``) are tokenised once in this process
(``build_data`` with ``data.cache_dir``), so the parallel runs only read the token cache; (2)
runs are started on free slots (``CUDA_VISIBLE_DEVICES=<gpu>``, ``--jobs-per-gpu`` processes per
GPU; without ``--gpus`` they run on the CPU, ``--cpu-jobs`` at a time), each with
``--output_dir`` under ``<out-dir>/runs/<variant>_lr<lr>/`` (``metrics.jsonl`` + ``stdout.log``);
(3) every run's
``metrics.jsonl`` is collected into ``<out-dir>/quality.json``, a PNG (validation perplexity and
training loss vs tokens) and a markdown table ``quality.md``.

``--max-seconds`` bounds the whole call: no run starts when less than ``--min-run-seconds`` is
left, and at the deadline unfinished runs are stopped (SIGTERM); they are kept, marked
``stopped (budget)`` with the tokens they reached, so unequal token counts are visible.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import REPO, Budget, provenance, write_json  # noqa: E402
from quality_report import losses_by_setting, plot, summary, table  # noqa: E402
from quality_variants import DEFAULT_VARIANTS, SIMULATED, VARIANTS  # noqa: E402

GPU_DATA = {  # paths staged by ../shared/gpu/stage.sh
    "train_files": ".gpu/data/enwiki2015/train-*.jsonl.xz",
    "val_files": ".gpu/data/enwiki2015/val.jsonl.xz",
    "tokenizer": ".gpu/data/tokenizer/enwiki-bpe-32k.json",
}


def data_section(args) -> dict[str, Any]:
    if args.data_source == "embedded":
        return {"source": "embedded", "max_bytes": args.max_bytes}
    cache = str(Path(args.cache_dir).resolve())
    data = {"source": "files", "train_files": args.train_files, "val_files": args.val_files,
            "tokenizer": args.tokenizer, "cache_dir": cache}  # fmt: skip
    if args.test_files:
        data["test_files"] = args.test_files
    return data


def pretokenize(data: dict[str, Any], seq_len: int, seed: int) -> dict[str, Any]:
    """Build the datasets once here so that ``data.cache_dir`` holds the tokens before the
    parallel runs start (each run then only reads the cache)."""
    t = time.perf_counter()
    from frugal_dist.train.pipeline import build_data

    bundle = build_data(data, seq_len, seed=seed)
    info = {"seconds": time.perf_counter() - t, "vocab_size": bundle.vocab_size,
            "train_tokens": _num_tokens(bundle.train),
            "val_tokens": _num_tokens(bundle.val)}  # fmt: skip
    if bundle.test is not None:
        info["test_tokens"] = _num_tokens(bundle.test)
    print(f"[quality] data ready in {info['seconds']:.1f}s: {info}", flush=True)
    return info


def _num_tokens(dataset: Any) -> int | None:
    """Tokens a dataset serves (None for streaming or datasets that do not say)."""
    try:
        return int(dataset.num_tokens)
    except Exception:  # noqa: BLE001 - informational only
        return None


def available_optimizers() -> tuple[str, ...]:
    from frugal_dist.train.optimizers import OPTIMIZERS

    return tuple(OPTIMIZERS)


STATE_FREE = ("frugal",)  # optimizer names with a state-free update (inactive_lr_scale applies)


def settings(args) -> list[tuple[str, float, float | None, int]]:
    """(variant, lr, inactive_lr_scale or None, seed) for every run of this call.

    Grid mode: every variant x ``--lrs`` x (``--inactive-lr-scales`` for FRUGAL variants, which
    have a state-free update; None for the others) x ``--seeds``. With ``--best-from``, each
    variant's (lr, scale) is instead the one with the lowest final validation loss among the
    finished runs of that earlier quality.json, run once per seed."""
    seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else [args.seed]
    variants = args.variants.split(",")
    if args.best_from:
        best = best_settings(json.loads(Path(args.best_from).read_text()), variants,
                             args.best_from)  # fmt: skip
        return [(v, lr, sc, seed) for v in variants for (lr, sc) in [best[v]] for seed in seeds]
    out = []
    for v in variants:
        scales = [float(x) for x in args.inactive_lr_scales.split(",")] \
            if VARIANTS[v]["name"] in STATE_FREE else [None]  # fmt: skip
        out += [(v, float(lr), sc, seed) for lr in args.lrs.split(",") for sc in scales
                for seed in seeds]  # fmt: skip
    return out


def best_settings(result: dict[str, Any], variants: list[str], path: str) -> dict[str, tuple]:
    """Per variant, the (lr, inactive_lr_scale) of its finished run with the lowest final
    validation loss (mean over seeds when a setting ran with several)."""
    scores = losses_by_setting(result)
    best: dict[str, tuple] = {}
    for v in variants:
        cands = {k[1:]: sum(x) / len(x) for k, x in scores.items() if k[0] == v}
        if not cands:
            raise SystemExit(f"--best-from {path}: variant "
                             f"{v!r} has no finished run there; drop it from --variants or "
                             "re-run its sweep")  # fmt: skip
        best[v] = min(cands, key=cands.get)
    return best


def run_name(variant: str, lr: float, scale: float | None, seed: int) -> str:
    return f"{variant}_lr{lr:g}" + ("" if scale is None else f"_free{scale:g}") + f"_seed{seed}"


def plan_runs(args, steps: int) -> list[dict[str, Any]]:
    runs = []
    offered = available_optimizers()
    for variant, lr, scale, seed in settings(args):
        opt = {**VARIANTS[variant], "lr": lr}
        if scale is not None:
            opt["inactive_lr_scale"] = scale
        if opt["name"] in ("frugal", "galore", "badam"):
            opt.setdefault("update_gap", args.update_gap)
        if opt["name"] in ("frugal", "galore", "badam", "adamw"):
            opt.setdefault("weight_decay", 0.0)
        if opt["name"] == "rso":
            opt.setdefault("inner_steps", args.update_gap)
        if opt.get("density_final") is not None:  # decays over the whole run
            opt.setdefault("density_decay_steps", steps)
        run = {"name": run_name(variant, lr, scale, seed), "variant": variant, "lr": lr,
               "inactive_lr_scale": scale, "seed": seed, "optimizer": opt,
               "status": "pending"}  # fmt: skip
        if opt["name"] not in offered:
            run.update(status="skipped", note=f"no {opt['name']!r} preset in "
                       f"frugal_dist.train.optimizers (offers {list(offered)})")  # fmt: skip
        runs.append(run)
    return runs


def command(args, run: dict[str, Any], data: dict[str, Any], steps: int, out: Path) -> list[str]:
    warmup = max(1, round(args.warmup_frac * steps))
    ranks, sim = simulated_flags(run["variant"])
    batch = args.batch_size // ranks  # simulated ranks: the same global batch, split
    cmd = [sys.executable, str(REPO / "launchers" / "train.py"), f"--model={args.model}",
           f"--seq_len={args.seq_len}", f"--batch_size={batch}", "--grad_accum=1",
           f"--max_steps={steps}", f"--warmup_steps={warmup}", f"--eval_every={args.eval_every}",
           f"--eval_batches={args.eval_batches}", f"--log_every={args.log_every}",
           f"--seed={run.get('seed', args.seed)}", "--engine=single", f"--dtype={args.dtype}",
           f"--output_dir={out}", "--checkpoint_every=0", "--keep_checkpoints=1"]  # fmt: skip
    cmd += [f"--optimizer.{k}={v}" for k, v in run["optimizer"].items()]
    cmd += [f"--data.{k}={v}" for k, v in data.items()]
    return cmd + sim + list(args.extra)


def simulated_flags(variant: str) -> tuple[int, list[str]]:
    """(simulated ranks W, ``launchers/train.py`` flags) of a simulated-ranks variant
    (``SIMULATED``; (1, []) for the others). ``parse_args`` checked that W divides the batch."""
    if variant not in SIMULATED:
        return 1, []
    _, _, ranks, node = SIMULATED[variant]
    return ranks, [f"--simulate_ranks={ranks}"] + ([f"--simulate_node_size={node}"] if node else [])


def schedule(args, runs, data, steps: int, budget: Budget, out_dir: Path) -> None:
    """Start pending runs on free slots until done or out of time."""
    slots = [str(g) for g in args.gpus.split(",") for _ in range(args.jobs_per_gpu)] \
        if args.gpus else [None] * args.cpu_jobs  # fmt: skip
    free = list(range(len(slots)))
    running: dict[int, tuple[subprocess.Popen, dict[str, Any], Any]] = {}
    pending = [r for r in runs if r["status"] == "pending"]
    try:
        _loop(args, slots, free, running, pending, data, steps, budget, out_dir)
    except BaseException:  # Ctrl-C or a crash here: stop the children, keep what they wrote
        for proc, run, log in running.values():
            _stop(proc)
            log.close()
            run.update(status="stopped (interrupted)", wall_s=budget.elapsed() - run["started"])
        raise


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the run's process group (it started its own session), SIGKILL after 15 s."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _loop(args, slots, free, running, pending, data, steps, budget, out_dir) -> None:
    while pending or running:
        while pending and free:
            run = pending.pop(0)
            if budget.remaining() < args.min_run_seconds:
                run.update(status="skipped", note="time budget (--max-seconds) exhausted")
                continue
            slot = free.pop(0)
            rdir = out_dir / "runs" / run["name"]
            rdir.mkdir(parents=True, exist_ok=True)
            (rdir / "metrics.jsonl").unlink(missing_ok=True)
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            if slots[slot] is not None:
                env["CUDA_VISIBLE_DEVICES"] = slots[slot]
                if args.tf32:
                    env["TORCH_ALLOW_TF32_CUBLAS_OVERRIDE"] = "1"
            else:
                env.setdefault("OMP_NUM_THREADS", "1")
            run["command"] = command(args, run, data, steps, rdir)
            run["device"] = f"cuda:{slots[slot]}" if slots[slot] is not None else "cpu"
            log = open(rdir / "stdout.log", "w")  # noqa: SIM115 - closed when the run ends
            proc = subprocess.Popen(run["command"], env=env, stdout=log, stderr=subprocess.STDOUT,
                                    cwd=os.getcwd(), start_new_session=True)  # fmt: skip
            run.update(status="running", started=budget.elapsed())
            running[slot] = (proc, run, log)
            print(f"[quality] {budget.elapsed():6.0f}s start {run['name']} on {run['device']}",
                  flush=True)  # fmt: skip
        time.sleep(0.5)
        overdue = budget.remaining() <= 0
        for slot, (proc, run, log) in list(running.items()):
            if overdue and proc.poll() is None:
                _stop(proc)
                run.update(status="stopped (budget)")
            if proc.poll() is None:
                continue
            log.close()
            # a quality run needs its metrics, not its checkpoint (60M: ~0.5 GB each; eight of
            # them made the results too big to bring back from the GPU machine)
            shutil.rmtree(out_dir / "runs" / run["name"] / "checkpoints", ignore_errors=True)
            run["returncode"] = proc.returncode
            run["wall_s"] = budget.elapsed() - run["started"]
            if run["status"] == "running":
                run["status"] = "ok" if proc.returncode == 0 else "failed"
            print(f"[quality] {budget.elapsed():6.0f}s {run['status']} {run['name']} "
                  f"({run['wall_s']:.0f}s)", flush=True)  # fmt: skip
            del running[slot]
            free.append(slot)


def collect(run: dict[str, Any], out_dir: Path) -> None:
    """Read the run's metrics.jsonl into ``run["records"]`` and summary fields."""
    rdir = out_dir / "runs" / run["name"]
    path = rdir / "metrics.jsonl"
    records = []
    if path.exists():
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):  # a line cut by a stopped run
                records.append(json.loads(line))
    run["records"] = records
    if run["status"] == "failed" and (rdir / "stdout.log").exists():
        run["log_tail"] = (rdir / "stdout.log").read_text()[-2000:]
    vals = [r for r in records if r.get("val_loss") is not None]
    run["tokens"] = records[-1]["tokens"] if records else 0
    run["final_val_loss"] = vals[-1]["val_loss"] if vals else None
    run["final_val_ppl"] = math.exp(min(vals[-1]["val_loss"], 50)) if vals else None
    run["best_val_loss"] = min(r["val_loss"] for r in vals) if vals else None
    tests = [r for r in records if r.get("test_loss") is not None]  # the last step's only
    run["final_test_loss"] = tests[-1]["test_loss"] if tests else None
    run["final_test_ppl"] = math.exp(min(tests[-1]["test_loss"], 50)) if tests else None
    tail = [r["loss"] for r in records[-5:] if "loss" in r]
    run["final_train_loss"] = sum(tail) / len(tail) if tail else None
    tps = [r["tokens_per_s"] for r in records[1:] if r.get("tokens_per_s")]
    run["tokens_per_s"] = sum(tps) / len(tps) if tps else None
    states = [r["opt_state_mib"] for r in records if r.get("opt_state_mib") is not None]
    run["opt_state_mib"] = states[-1] if states else None


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="arguments after -- go to every launchers/train.py run",
    )
    ap.add_argument("--model", default="60m")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=64, help="sequences per step (one GPU)")
    ap.add_argument("--total-tokens", type=int, default=10_000_000)
    ap.add_argument(
        "--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma list of {list(VARIANTS)}"
    )
    ap.add_argument("--lrs", default="1e-3", help="comma list: every variant runs every lr")
    ap.add_argument(
        "--inactive-lr-scales",
        default="1",
        help="comma list of FRUGAL state-free lr scales (FRUGAL variants only)",
    )
    ap.add_argument("--seeds", default=None, help="comma list of seeds (default: --seed)")
    ap.add_argument(
        "--best-from",
        default=None,
        help="an earlier quality.json: run each variant's best (lr, scale) only",
    )
    ap.add_argument("--update-gap", type=int, default=200)
    ap.add_argument("--warmup-frac", type=float, default=0.1)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--eval-batches", type=int, default=16)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument(
        "--no-tf32",
        dest="tf32",
        action="store_false",
        help="GPU runs use TF32 matmuls (TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1) unless set",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gpus", default="", help="e.g. 0,1; empty: run on the CPU")
    ap.add_argument("--jobs-per-gpu", type=int, default=1)
    ap.add_argument("--cpu-jobs", type=int, default=1)
    ap.add_argument("--max-seconds", type=float, default=None)
    ap.add_argument("--min-run-seconds", type=float, default=30.0)
    ap.add_argument("--data-source", choices=("files", "embedded"), default="files")
    ap.add_argument("--train-files", default=GPU_DATA["train_files"])
    ap.add_argument("--val-files", default=GPU_DATA["val_files"])
    ap.add_argument(
        "--test-files",
        default=None,
        help="glob of a test split (--data.test_files): each run evaluates it once at the end",
    )
    ap.add_argument("--tokenizer", default=GPU_DATA["tokenizer"])
    ap.add_argument("--cache-dir", default=".gpu/cache/tokens")
    ap.add_argument("--max-bytes", type=int, default=2_000_000, help="embedded source only")
    ap.add_argument("--out-dir", default=None)
    ap.add_argument("--replot", default=None, help="redraw the PNG/table of a quality.json")
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = ap.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    args.extra = extra
    for v in args.variants.split(","):
        if v not in VARIANTS:
            ap.error(f"--variants: unknown {v!r}; choose from {list(VARIANTS)}")
    for flag, text, kind in (("--lrs", args.lrs, float),
                             ("--inactive-lr-scales", args.inactive_lr_scales, float),
                             ("--seeds", args.seeds or "0", int)):  # fmt: skip
        try:
            [kind(x) for x in text.split(",")]
        except ValueError:
            ap.error(f"{flag} must be a comma list of {kind.__name__}s, got {text!r}")
    for v in args.variants.split(","):
        if v in SIMULATED and args.batch_size % SIMULATED[v][2]:
            ap.error(f"--batch-size {args.batch_size}: variant {v!r} splits it over "
                     f"{SIMULATED[v][2]} simulated ranks; pass a multiple of it")  # fmt: skip
    if args.test_files is not None and args.data_source != "files":
        ap.error(f"--test-files needs --data-source files (got {args.data_source!r}: the "
                 "embedded corpus has no test split)")  # fmt: skip
    if args.test_files is not None and not args.test_files:
        ap.error("--test-files is empty; give a glob or leave it out")
    if args.best_from and not Path(args.best_from).is_file():
        ap.error(f"--best-from {args.best_from!r}: no such file (a quality.json of a sweep)")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.replot:
        result = json.loads(Path(args.replot).read_text())
        plot(result, Path(args.replot).with_suffix(".png"))
        print(summary(result) + "\n\n" + table(result))
        return
    budget = Budget(args.max_seconds)
    out_dir = Path(args.out_dir or REPO / "benchmarks" / "results" / f"quality_{args.model}")
    tokens_per_step = args.batch_size * args.seq_len
    steps = args.total_tokens // tokens_per_step
    if steps < 1:
        raise SystemExit(f"--total-tokens {args.total_tokens} < one step ({tokens_per_step})")
    data = data_section(args)
    result: dict[str, Any] = {"benchmark": "quality", "config": vars(args), "data": data,
                              "steps": steps, "tokens_per_step": tokens_per_step,
                              "provenance": provenance()}  # fmt: skip
    runs = plan_runs(args, steps)  # first: a bad --best-from fails before the data are built
    result["data_prep"] = pretokenize(data, args.seq_len, args.seed)
    result["runs"] = runs
    try:
        schedule(args, runs, data, steps, budget, out_dir)
    finally:
        for run in runs:
            collect(run, out_dir)
        result["elapsed_s"] = budget.elapsed()
        write_json(out_dir / "quality.json", result)
        md = summary(result) + "\n\nEvery run:\n\n" + table(result)
        (out_dir / "quality.md").write_text(md + "\n")
        print(md)
        print(f"wrote {out_dir / 'quality.json'}")
        plot(result, out_dir / "quality.png")


if __name__ == "__main__":
    main()
