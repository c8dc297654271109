"""Streaming (``source: hf``, ``streaming: true``) resume from the backend's stream position.

A resumed run must serve exactly the tokens of the uninterrupted one, must not read the
documents this rank already consumed when the checkpoint holds a ``datasets`` position, and must
fall back to re-reading (one rank-0 line) when it does not. Offline: the packaged ``json``
builder on local files, one data object per simulated rank (``rank`` / ``world_size`` args).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import frugal_dist.train.streaming as streaming
from frugal_dist.train.logs import setup_console
from frugal_dist.train.pipeline import build_data

# variable lengths; every 11th record is empty (skipped by hf_documents, but still a record)
TEXTS = [
    "" if i % 11 == 5 else f"<{i:03d}> " + "xyzw"[i % 4] * (3 + 13 * (i % 6)) for i in range(150)
]
DOC_ID = re.compile(r"<(\d{3})>")
SEQ, BS = 32, 3


@pytest.fixture(autouse=True)
def _console() -> None:
    setup_console(0)  # notices go through the frugal_dist logger, to stdout (as under train())


def _cfg(tmp_path: Path, n_files: int, **extra) -> dict:
    files = []
    per = len(TEXTS) // n_files
    for k in range(n_files):
        path = tmp_path / f"part-{n_files}-{k}.jsonl"
        with open(path, "w", encoding="utf-8") as fh:
            for text in TEXTS[k * per : (k + 1) * per]:
                fh.write(json.dumps({"text": text}) + "\n")
        files.append(str(path))
    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps({"text": f"val {i} " * 9}) + "\n" for i in range(20)))
    data_files = {"train": files, "validation": str(val)}
    return {"source": "hf", "name": "json", "streaming": True, "data_files": data_files, **extra}


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every document the streaming module pulls from a ``datasets`` stream, in order."""
    log: list[str] = []
    real = streaming._doc_filter  # the documents of a stream (after the hash holdout)

    def counting(docs, holdout):
        for text in real(docs, holdout):
            log.append(text)
            yield text

    monkeypatch.setattr(streaming, "_doc_filter", counting)
    return log


def _reference(cfg: dict, rank: int, world: int, steps: int, reads: list[str] | None = None):
    data = build_data(cfg, seq_len=SEQ, seed=0).train
    if reads is not None:
        reads.clear()  # drop the validation documents build_data read
    states, batches = [], []
    for s in range(steps):
        states.append(json.loads(json.dumps(data.state_dict())))  # as a checkpoint stores it
        batches.append(data.batch(s, BS, rank, world))
    return states, batches


def _resume(
    cfg: dict, state: dict, rank: int, world: int, steps: range, reads: list[str] | None = None
) -> list[torch.Tensor]:
    data = build_data(cfg, seq_len=SEQ, seed=0).train
    if reads is not None:
        reads.clear()
    data.load_state_dict(state)
    return [data.batch(s, BS, rank, world) for s in steps]


@pytest.mark.parametrize(
    ("n_files", "world", "extra"),
    [
        (2, 1, {}),
        (2, 2, {}),  # a file per rank (datasets shards by file)
        (3, 2, {"val_split": None, "val_fraction": 0.2}),  # every 2nd record; hash holdout
    ],
)
def test_position_resume_is_exact_and_reads_no_consumed_document(
    tmp_path: Path, reads: list[str], n_files: int, world: int, extra: dict
) -> None:
    cfg = _cfg(tmp_path, n_files, **extra)
    for rank in range(world):
        steps = 40 if world > 1 else 75
        states, batches = _reference(cfg, rank, world, steps, reads=reads)
        stream = list(reads)  # this rank's documents, epoch after epoch
        assert states[-1]["epoch"] >= 1, "the run must cross an epoch boundary"
        for at in (3, 11, steps // 2 + 6, steps - 3):
            state = states[at]
            assert state["position"] is not None and state["digest"] is not None
            got = _resume(cfg, state, rank, world, range(at, at + 3), reads)
            for k, batch in enumerate(got):
                assert torch.equal(batch, batches[at + k]), (rank, at, k)
            # reading restarts at the cursor's document (the partly used one): none of the
            # ``doc`` documents before it in this epoch is read again
            per_epoch = stream.index(stream[0], 1)  # no shuffle: every epoch in the same order
            head = state["epoch"] * per_epoch + state["doc"]
            n = min(len(reads), len(stream) - head)
            assert n > 0 and reads[:n] == stream[head : head + n], (rank, at)
            assert len(reads) <= 2 * 64  # at most two chunks (one per epoch) for three steps


def test_checkpoint_without_position_resumes_by_re_reading(
    tmp_path: Path, reads: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _cfg(tmp_path, 2)
    for rank, world in ((0, 1), (1, 2)):
        states, batches = _reference(cfg, rank, world, steps=14)
        old = {k: v for k, v in states[9].items() if k not in ("position", "digest")}
        assert old["doc"] > 0
        capsys.readouterr()
        got = _resume(cfg, old, rank, world, range(9, 13), reads)
        assert all(torch.equal(b, batches[9 + k]) for k, b in enumerate(got))
        assert len(reads) > old["doc"]  # the consumed documents were read again
        out = capsys.readouterr().out.strip().splitlines()
        if rank == 0:
            assert len(out) == 1 and f"re-reading {old['doc']} documents" in out[0]
        else:
            assert out == []


def test_shuffle_buffer_uses_the_fallback_and_stays_exact(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _cfg(tmp_path, 2, shuffle_buffer=8)  # IterableDataset.state_dict drops the buffer
    states, batches = _reference(cfg, 0, 1, steps=12)
    assert states[8]["position"] is None and states[8]["doc"] > 0
    capsys.readouterr()
    got = _resume(cfg, states[8], 0, 1, range(8, 12))
    assert all(torch.equal(b, batches[8 + k]) for k, b in enumerate(got))
    assert "no stream position" in capsys.readouterr().out


def test_position_of_other_data_is_refused(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, 2)
    states, _ = _reference(cfg, 0, 1, steps=6)
    bad = {**states[5], "digest": "0" * 16}
    data = build_data(cfg, seq_len=SEQ, seed=0).train
    data.load_state_dict(bad)
    with pytest.raises(ValueError, match="cannot resume: the document at the checkpoint"):
        data.batch(5, BS)


def test_training_loop_resume_uses_the_position(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Through ``train``: checkpoint (trainer.pt) -> --resume, same weights, no re-reading."""
    import shutil

    from frugal_dist.train.config import build_config
    from frugal_dist.train.loop import train

    base = {"model": "tiny", "seq_len": SEQ, "batch_size": 2, "max_steps": 4, "warmup_steps": 1,
            "log_every": 1, "eval_every": 0, "checkpoint_every": 2, "keep_checkpoints": 0,
            "engine": "single", "data": _cfg(tmp_path, 2)}  # fmt: skip
    full, part = tmp_path / "full", tmp_path / "part"
    train(build_config({**base, "output_dir": str(full)}))
    step = full / "checkpoints" / "step_00000002"
    data_state = torch.load(step / "trainer.pt", weights_only=False)["data"][0]
    assert data_state["doc"] > 0 and json.loads(data_state["position"])  # JSON text
    shutil.copytree(step, part / "checkpoints" / step.name)
    capsys.readouterr()
    summary = train(build_config({**base, "output_dir": str(part), "resume": "auto"}))
    assert summary["steps"] == 2 and "re-reading" not in capsys.readouterr().out
    want = torch.load(full / "checkpoints" / "step_00000004" / "model.pt")
    got = torch.load(part / "checkpoints" / "step_00000004" / "model.pt")
    assert all(torch.equal(got[k], v) for k, v in want.items())
