"""FRUGAL through ``transformers.Trainer`` on a tiny random LlamaForCausalLM (CPU): the loss falls
and the optimizer state is smaller than AdamW's; and the same under ``deepspeed=`` (ZeRO-2)."""

from __future__ import annotations

import importlib.util

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from tests.integration import hf_trainer_workers as hw  # noqa: E402

STEPS = 12


def _adamw_run(tmp_path):
    from transformers import Trainer

    trainer = Trainer(model=hw.tiny_llama(), args=hw.args(str(tmp_path / "adamw"), STEPS),
                      train_dataset=hw.Repeating())  # fmt: skip
    trainer.train()
    return trainer


def test_frugal_optimizer_object_with_trainer(tmp_path):
    from transformers import Trainer, get_cosine_schedule_with_warmup

    from frugal_dist.integrations.hf_trainer import create_frugal_optimizer

    model = hw.tiny_llama()
    opt = create_frugal_optimizer(model, lr=3e-3, density=0.25, update_gap=5)
    sched = get_cosine_schedule_with_warmup(opt, 2, STEPS)
    trainer = Trainer(model=model, args=hw.args(str(tmp_path / "frugal"), STEPS),
                      train_dataset=hw.Repeating(), optimizers=(opt, sched))  # fmt: skip
    trainer.train()
    losses = hw.losses(trainer)
    assert len(losses) == STEPS
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses
    groups = {g["name"]: g["names"] for g in opt.param_groups}
    assert groups["state_full"] == ["model.embed_tokens.weight", "lm_head.weight"]
    adamw = _adamw_run(tmp_path)
    # block subspace, rho 0.25: a quarter of the split matrices carry moments, the rest none
    assert opt.state_bytes() < 0.75 * hw.optimizer_state_bytes(adamw.optimizer)


def test_frugal_trainer_builds_frugal_from_options(tmp_path):
    from frugal_dist import FRUGAL
    from frugal_dist.integrations.hf_trainer import FrugalTrainer

    trainer = FrugalTrainer(model=hw.tiny_llama(), args=hw.args(str(tmp_path / "ft"), STEPS),
                            train_dataset=hw.Repeating(),
                            frugal_options=dict(subspace="coordinate", density=0.25,
                                                update_gap=5))  # fmt: skip
    trainer.train()
    losses = hw.losses(trainer)
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses
    inner = trainer.optimizer.optimizer  # accelerate's AcceleratedOptimizer around FRUGAL
    assert isinstance(inner, FRUGAL) and inner.defaults["lr"] == 3e-3  # from learning_rate


def test_frugal_trainer_honours_training_arguments(tmp_path):
    from frugal_dist.integrations.hf_trainer import FrugalTrainer

    args = hw.args(str(tmp_path / "wd"), STEPS, weight_decay=0.1, adam_beta2=0.95,
                   adam_epsilon=1e-6)  # fmt: skip
    trainer = FrugalTrainer(model=hw.tiny_llama(), args=args, train_dataset=hw.Repeating(),
                            frugal_options={"density": 0.25})  # fmt: skip
    opt = trainer.create_optimizer()
    decay = {g["name"]: g["weight_decay"] for g in opt.param_groups}
    assert decay == {"split": 0.1, "state_full": 0.1, "no_decay": 0.0}  # norms: none, as Trainer
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["eps"] == 1e-6
    explicit = FrugalTrainer(model=hw.tiny_llama(), args=args, train_dataset=hw.Repeating(),
                             frugal_options={"weight_decay": 0.0})  # fmt: skip
    assert all(g["weight_decay"] == 0.0 for g in explicit.create_optimizer().param_groups)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed")
def test_frugal_trainer_with_deepspeed_zero2(tmp_path):
    from tests.distributed.launch import run_distributed

    got = run_distributed(hw.deepspeed_zero2, 1, str(tmp_path / "ds"), STEPS)[0]
    assert got["layout"] == "flat"  # bound to ZeRO-2's flat partition
    losses = got["losses"]
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses


def _check_loss_driven(got: dict, steps: int) -> None:
    # one observation per optimizer step, after it: the step's loss as Trainer logs it (the
    # micro-batches' mean, averaged over the processes)
    assert got["observed"] == pytest.approx(got["losses"], rel=1e-6), got
    assert len(got["observed"]) == steps
    # T doubled at each decision (tau 1): refreshes at steps 0, 2, 4, 8 (k = 0..3), T now 8
    assert set(got["schedule"].values()) == {(3, 8)}, got["schedule"]


def test_frugal_trainer_feeds_the_loss_to_loss_driven_refresh(tmp_path):
    """refresh_policy="loss" under FrugalTrainer with 2 gradient-accumulation micro-batches: no
    "no loss was observed" error, the loss of every step observed, T grown."""
    got = hw.loss_driven(0, 1, str(tmp_path / "loss"), STEPS, 2)
    _check_loss_driven(got, STEPS)
    assert got["observed"] == pytest.approx(got["local"], rel=1e-6)


@pytest.mark.distributed
def test_frugal_trainer_loss_driven_refresh_on_two_ranks(tmp_path):
    """2 gloo processes, each its own half of the batch (different losses): both observe the
    same, process-averaged loss, so their refresh decisions agree (the refresh fingerprint
    comparison would stop them otherwise) and match the logged losses."""
    from tests.distributed.launch import run_distributed

    got = run_distributed(hw.loss_driven, 2, str(tmp_path / "loss2"), STEPS, 2)
    assert [g["processes"] for g in got] == [2, 2]
    assert all(a != b for a, b in zip(got[0]["local"], got[1]["local"]))  # own halves
    assert got[0]["observed"] == got[1]["observed"]
    mean = [(a + b) / 2 for a, b in zip(got[0]["local"], got[1]["local"])]
    assert got[0]["observed"] == pytest.approx(mean, rel=1e-6)
    for g in got:
        _check_loss_driven(g, STEPS)
