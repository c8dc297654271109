"""FSDP2's ``shard_model`` on a Hugging Face ``LlamaForCausalLM`` (tiny, random init) with FRUGAL at
2 ranks reproduces the single-process trajectory."""

from __future__ import annotations

import pytest

from tests.distributed import cases
from tests.distributed.launch import run_distributed

pytest.importorskip("transformers")
pytestmark = pytest.mark.distributed

from tests.distributed import hf_workers as hw  # noqa: E402

COMMON = dict(lr=3e-3, density=0.25, update_gap=3, weight_decay=0.01)
STEPS = 6


def test_hf_param_groups_follow_the_paper_rules():
    groups = hw.hf_single(1, {**COMMON, **cases.SUBSPACES["columns"]})["groups"]
    assert groups["state_full"] == ["model.embed_tokens.weight", "lm_head.weight"]
    assert all(n.endswith("norm.weight") for n in groups["no_decay"])
    assert len(groups["split"]) == 2 * 7  # q, k, v, o, gate, up, down per layer


@pytest.mark.parametrize("kind", ["block-descending", "columns", "projection"])
def test_shard_model_on_hf_llama_matches_single_process(kind):
    kw = {**COMMON, **cases.SUBSPACES[kind]}
    ref = hw.hf_single(STEPS, kw)
    got = run_distributed(hw.hf_fsdp2, 2, STEPS, kw)[0]
    assert got["n_blocks"] == 2  # shard_model found model.model.layers
    assert got["losses"] == pytest.approx(ref["losses"], rel=1e-6)
    worst = max((got["params"][k] - ref["params"][k]).abs().max().item() for k in ref["params"])
    # As in test_fsdp2: float32 optimizer math on row shards vs whole matrices.
    assert worst < 5e-6, worst
