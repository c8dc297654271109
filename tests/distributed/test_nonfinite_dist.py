"""Non-finite gradients on real processes (gloo): one rank's inf makes every rank skip the step
(the flag is all-reduced), so sharded state and collectives stay in lockstep; and DeepSpeed
ZeRO-2's own fp16 overflow skip drives FRUGAL unchanged. One launch per kernels option for the
FRUGAL tests and one for both DeepSpeed tests (``launch.run_each``)."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from frugal_dist import FRUGAL
from tests.distributed import workers
from tests.distributed.launch import run_each

pytestmark = pytest.mark.distributed

POISON_STEP = 3
KW = dict(lr=1e-2, density=0.4, update_gap=4, weight_decay=0.01, subspace="coordinate")


TRITON = os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton")
NEEDS_TRITON = pytest.mark.skipif(not TRITON, reason="needs TRITON_INTERPRET=1 and triton")
KERNELS = ["auto", pytest.param("triton", marks=NEEDS_TRITON)]


def _global_norm(grads: list[torch.Tensor], world: int) -> torch.Tensor:
    """What a clip before the step returns: the total 2-norm of every rank's gradients (local
    sum of squares, all-reduced outside the step, so the optimizer's comm_stats do not see it)."""
    sq = torch.stack([g.float().pow(2).sum() for g in grads]).sum()
    if world > 1:
        torch.distributed.all_reduce(sq)
    return sq.sqrt()


def _poisoned_run(
    rank: int, world: int, steps: int, mode: str, poison_rank: int, kernels: str = "auto",
    nan: bool = False, with_norm: bool = False,
) -> dict:  # fmt: skip
    """``mode`` "optimizer": FRUGAL reduces the gradients and shards its state; rank
    ``poison_rank`` gets an inf (``nan``: a nan) at ``POISON_STEP``. "single": one process,
    mean gradients, the poisoned step left out. ``kernels="triton"``: the one-launch check (and
    apply kernels). ``with_norm``: every step gets ``grad_norm`` (``_global_norm``), and the
    poisoned step's ``comm_stats()`` are returned."""
    split, full = workers.named_params()
    params = split + full
    shapes = [tuple(p.shape) for p in params]
    dist_kw = dict(reduce_gradients=True, shard_state=True) if mode == "optimizer" else {}
    opt = FRUGAL(workers.groups(split, full), **dist_kw, kernels=kernels, **KW)
    for step in range(steps):
        if mode == "single":
            if step == POISON_STEP:
                continue
            grads = workers.mean_grads(step, world, shapes)
        else:
            grads = workers.rank_grads(step, rank, shapes)
            if step == POISON_STEP and rank == poison_rank:
                grads[2][1, 1] = float("nan") if nan else float("inf")
        for p, g in zip(params, grads):
            p.grad = g.clone()
        if not with_norm:
            opt.step()
            continue
        norm = _global_norm(grads, world)
        opt.step(grad_norm=norm)
        if step == POISON_STEP:
            poisoned = {"norm": norm.item(), "comm": opt.comm_stats(),
                        "skipped_then": opt.skipped_steps()}  # fmt: skip
    out = {"params": [p.detach().clone() for p in params], "skipped": opt.skipped_steps(),
           "comm_total": opt.comm_stats()["total"]}  # fmt: skip
    if with_norm:
        out["poisoned"] = poisoned
    return out


def _raise_run(rank: int, world: int, kernels: str = "auto") -> str:
    split, full = workers.named_params()
    opt = FRUGAL(workers.groups(split, full), nonfinite="raise", reduce_gradients=True,
                 kernels=kernels, **KW)  # fmt: skip
    for p, g in zip(split + full, workers.rank_grads(0, rank, [p.shape for p in split + full])):
        p.grad = g.clone()
    if rank == 1:
        full[0].grad[3] = float("nan")
    try:
        opt.step()
    except FloatingPointError as e:
        return str(e)
    return "no error"


def _flat_run(rank: int, world: int, steps: int, with_norm: bool, kernels: str) -> dict:
    """FRUGAL bound to ZeRO-style flat partitions (``FlatLayout``, as ``workers.zero_sim_run``):
    rank r holds piece r of each group's packed parameters and of the mean gradient; at
    ``POISON_STEP`` rank 1's piece of the first group holds a nan. ``with_norm``: every step gets
    the global norm of the pieces (``_global_norm``)."""
    split, full = workers.named_params()
    opt = FRUGAL(workers.groups(split, full), kernels=kernels, **KW)
    flats = workers.bind_flat_partitions(opt, rank, world)
    shapes = [tuple(p.shape) for p in split + full]
    poisoned = {}
    for step in range(steps):
        grads = workers.mean_grads(step, world, shapes)
        for (flat, size), gs in zip(flats, [grads[: len(split)], grads[len(split) :]]):
            g = torch.cat([x.reshape(-1) for x in gs])
            g = torch.cat([g, g.new_zeros(size * world - g.numel())])
            flat.grad = g[rank * size : (rank + 1) * size].clone()
        if step == POISON_STEP and rank == 1:
            flats[0][0].grad[0] = float("nan")
        if with_norm:
            opt.step(grad_norm=_global_norm([f.grad for f, _ in flats], world))
        else:
            opt.step()
        if step == POISON_STEP:
            poisoned = {"comm": opt.comm_stats()["last_step"], "skipped": opt.skipped_steps()}
    return {"flats": [f.detach().clone() for f, _ in flats], "poisoned": poisoned,
            "skipped": opt.skipped_steps(), "comm_total": opt.comm_stats()["total"]}  # fmt: skip


def _dtensor_norms(rank: int, world: int) -> dict:
    """``grad_norm`` as a DTensor (FSDP2's ``clip_grad_norm_`` returns one): a replicated one is
    taken (its local value), a partial one is refused naming ``full_tensor()``."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate

    mesh = init_device_mesh("cpu", (world,))
    split, full = workers.named_params()
    opt = FRUGAL(workers.groups(split, full), **KW)
    for p, g in zip(split + full, workers.rank_grads(0, 0, [p.shape for p in split + full])):
        p.grad = g.clone()
    nan = DTensor.from_local(torch.tensor(float("nan")), mesh, [Replicate()])
    opt.step(grad_norm=nan)
    partial = DTensor.from_local(torch.tensor(1.0), mesh, [Partial()])
    try:
        opt.step(grad_norm=partial)
        refused = "no error"
    except ValueError as e:
        refused = str(e)
    return {"skipped": opt.skipped_steps(), "refused": refused,
            "untouched": all(len(opt.state[p]) == 0 for p in split + full)}  # fmt: skip


STEPS = 8


def _both(rank: int, world: int, kernels: str) -> dict[str, object]:
    return {
        "poisoned": _poisoned_run(rank, world, STEPS, "optimizer", 1, kernels),
        "raise": _raise_run(rank, world, kernels),
        "norm": _poisoned_run(rank, world, STEPS, "optimizer", 1, kernels, True, True),
        "flat": _flat_run(rank, world, STEPS, False, kernels),
        "flat_norm": _flat_run(rank, world, STEPS, True, kernels),
        "dtensor": _dtensor_norms(rank, world),
    }


@pytest.fixture(scope="module", params=KERNELS)
def runs(request) -> tuple[str, list[dict]]:
    """(kernels, every rank's poisoned run and raise message): one 2-process launch each."""
    kernels = request.param
    return kernels, run_each(_both, 2, {"runs": (kernels,)})["runs"]


def test_one_ranks_inf_skips_the_step_on_every_rank(runs):
    kernels, both = runs
    got = [b["poisoned"] for b in both]
    ref = _poisoned_run(0, 2, STEPS, "single", -1, kernels)
    for r in range(2):
        assert got[r]["skipped"] == 1
        # Exact: gradients are dyadic, so the surviving steps reproduce the single run bitwise.
        # "triton": the single run's coordinate items take the Triton apply kernel, the sharded
        # run's the torch path (elementwise: sharded state keeps it): float32 last bits
        # (measured 1.2e-7).
        diff = max((a - b).abs().max().item() for a, b in zip(got[r]["params"], ref["params"]))
        assert diff <= (0.0 if kernels == "auto" else 1e-6), (r, diff)


def test_a_global_nan_norm_skips_on_every_rank_with_no_collective(runs):
    """``step(grad_norm=...)``: rank 1's nan makes the global norm nan on both ranks; both skip
    with no collective at all that step (no flag all-reduce, nothing else); no step of the run
    counts a flag; the finite steps equal the run without grad_norm."""
    kernels, both = runs
    ref = [b["poisoned"] for b in both]
    for r in range(2):
        got = both[r]["norm"]
        assert got["poisoned"]["norm"] != got["poisoned"]["norm"]  # nan on both ranks
        assert got["poisoned"]["skipped_then"] == 1 and got["skipped"] == 1
        assert got["poisoned"]["comm"]["last_step"] == {}, got["poisoned"]["comm"]
        assert got["poisoned"]["comm"]["last_step_total"] == 0
        assert "nonfinite_flag" not in got["comm_total"], got["comm_total"]
        assert "nonfinite_flag" in ref[r]["comm_total"]  # without grad_norm: counted
        diff = max((a - b).abs().max().item() for a, b in zip(got["params"], ref[r]["params"]))
        assert diff == 0.0, (r, diff)


def test_a_nan_in_one_ranks_fragment_skips_on_every_rank_by_the_global_norm(runs):
    """Under a layout (flat ZeRO-style fragments): rank 1's fragment holds the nan, rank 0's are
    finite; the global norm passed is nan on both, both skip with no collective that step, and
    the run equals the one checking the fragments (which all-reduces a flag)."""
    both = runs[1]
    for r in range(2):
        got, ref = both[r]["flat_norm"], both[r]["flat"]
        assert got["poisoned"] == {"comm": {}, "skipped": 1}, got["poisoned"]
        assert ref["poisoned"]["comm"] == {"nonfinite_flag": 4}, ref["poisoned"]
        assert got["skipped"] == ref["skipped"] == 1
        assert "nonfinite_flag" not in got["comm_total"]
        assert all(torch.equal(a, b) for a, b in zip(got["flats"], ref["flats"]))


def test_a_replicated_dtensor_norm_is_taken_and_a_partial_one_refused(runs):
    for r in runs[1]:
        got = r["dtensor"]
        assert got["skipped"] == 1 and got["untouched"], got
        assert "grad_norm is a DTensor" in got["refused"] and "full_tensor()" in got["refused"]


def test_raise_names_the_parameter_on_its_rank_and_says_another_rank_elsewhere(runs):
    msgs = [b["raise"] for b in runs[1]]
    assert "on another rank" in msgs[0], msgs[0]
    assert "'extra.0'" in msgs[1], msgs[1]


# ---------------------------------------------------------------------------- DeepSpeed, fp16
def _ds_fp16(rank: int, world: int, steps: int, poison_step: int, fp16: bool = True) -> dict:
    """ZeRO-2 with fp16 dynamic loss scaling (if this DeepSpeed allows it on the CPU), or in
    float32 (``fp16=False``: no loss scaler, so FRUGAL's own check must catch the inf)."""
    import frugal_dist.deepspeed as fds
    from tests.distributed import ds_workers

    cfg = ds_workers.ds_config(2, False, dict(KW, subspace="block"))
    if fp16:
        # hysteresis 1: every overflow halves the scale (DeepSpeed's default, 2, halves it only
        # at the second overflow in a row; the first one is skipped at the same scale)
        cfg["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 4, "hysteresis": 1}
    try:
        engine, *_ = fds.initialize(model=ds_workers.Probe(), config=cfg)
    except Exception as e:  # noqa: BLE001 - the reason is reported to the test
        return {"unsupported": f"{type(e).__name__}: {e}"}
    frugal = engine.optimizer.optimizer
    assert isinstance(frugal, FRUGAL)
    scales, frugal_steps = [], []
    for step in range(steps):
        cs = ds_workers.coefficients(step, rank, torch.float16 if fp16 else torch.float32)
        if step == poison_step and rank == 0:
            cs[0][0, 0] = float("inf")
        loss = engine(cs)
        engine.backward(loss)
        engine.step()
        scales.append(float(getattr(engine.optimizer, "loss_scale", 1.0)))
        counters = [  # "step", or "<name>::step" under a flat (ZeRO) layout
            v for s in frugal.state.values() for k, v in s.items() if k.split("::")[-1] == "step"
        ]
        frugal_steps.append(int(counters[0].item()) if counters else 0)
    return {"scales": scales, "frugal_steps": frugal_steps, "skipped": frugal.skipped_steps()}


@pytest.fixture(scope="module")
def ds_runs() -> dict[bool, list[dict]]:
    """fp16 -> every rank's ZeRO-2 run (inf at step 2): one 2-process launch for both."""
    pytest.importorskip("deepspeed")
    return run_each(_ds_fp16, 2, {True: (5, 2, True), False: (5, 2, False)})


@pytest.mark.slow
def test_deepspeed_zero2_fp16_overflow_skips_frugal_step(ds_runs):
    res = ds_runs[True]
    if "unsupported" in res[0]:
        pytest.skip(f"DeepSpeed refuses fp16 on this machine: {res[0]['unsupported']}")
    for r in res:
        # DeepSpeed found the overflow itself: it halved the scale and never called FRUGAL's
        # step for that iteration, so FRUGAL took one step fewer and skipped nothing itself.
        assert r["scales"][2] == r["scales"][1] / 2, r["scales"]
        assert r["frugal_steps"] == [1, 2, 2, 3, 4], r["frugal_steps"]
        assert r["skipped"] == 0


@pytest.mark.slow
def test_deepspeed_zero2_overflow_skip_never_reaches_frugal(ds_runs):
    """Without a loss scaler (float32), ZeRO-2 checks its reduced partitions for overflow too,
    with the same skip path as fp16 (the test above; DeepSpeed 0.19.8 runs fp16 on the CPU): an
    inf forced into one rank's gradient makes DeepSpeed skip the whole iteration, FRUGAL's step
    is not called, and FRUGAL's own check never fires."""
    res = ds_runs[False]
    for r in res:
        assert r["frugal_steps"] == [1, 2, 2, 3, 4], r["frugal_steps"]
        assert r["skipped"] == 0
