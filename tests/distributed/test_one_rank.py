"""One-rank use of FRUGAL while a default process group exists (issue 17, item 3): rank 0 alone
builds and steps an optimizer, rank 1 joins no collective. Nothing may hang: a replicated
optimizer with a fixed seed and ``check_agreement=False`` needs no collective (its inf/nan check
is local) and equals the single-process run; one that needs its group (the agreement check,
``seed=None``) raises ``ParticipantsError`` within ``FRUGAL_DIST_PARTICIPANTS_TIMEOUT_S``."""

from __future__ import annotations

import pytest

from tests.distributed import one_rank_workers as w
from tests.distributed.launch import run_distributed

pytestmark = pytest.mark.distributed

TIMEOUT_S = 3.0


def test_rank0_only_optimizer_never_hangs(monkeypatch):
    monkeypatch.setenv("FRUGAL_DIST_PARTICIPANTS_TIMEOUT_S", str(TIMEOUT_S))
    got = run_distributed(w.rank0_only, 2, 20.0, deadline_s=90)[0]
    # 1. no collective: the same parameters as a process with no process group at all
    ref, ref_skipped = w.train({**w.OPTIONS, "check_agreement": False})
    assert got["local_skipped"] == ref_skipped == 1  # the nan step, skipped on this rank alone
    for n, t in ref.items():
        assert got["local_params"][n].equal(t), n
    assert got["local_s"] < TIMEOUT_S, got["local_s"]  # it never waited for rank 1
    # 2./3. the collectives that establish the participants fail fast with the fix named
    for case in ("agreement", "seed_none"):
        res = got[case]
        assert res["error"] == "ParticipantsError", (case, res)
        assert TIMEOUT_S - 0.5 < res["s"] < TIMEOUT_S + 10, (case, res["s"])
        for text in (
            "process_group",
            "check_agreement=False",
            "FRUGAL_DIST_PARTICIPANTS_TIMEOUT_S",
        ):
            assert text in res["message"], (case, text, res["message"])


def test_participants_timeout_env_is_validated(monkeypatch):
    from frugal_dist.comm.participants import participants_timeout_s

    monkeypatch.setenv("FRUGAL_DIST_PARTICIPANTS_TIMEOUT_S", "soon")
    with pytest.raises(ValueError, match="FRUGAL_DIST_PARTICIPANTS_TIMEOUT_S"):
        participants_timeout_s()
    monkeypatch.delenv("FRUGAL_DIST_PARTICIPANTS_TIMEOUT_S")
    assert participants_timeout_s() == 300.0
