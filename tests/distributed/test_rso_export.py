"""RSO export (issue 17, item 4): an RSO-trained Hugging Face LLaMA (2 gloo ranks, DDP, one merge
done and a non-zero B pending) saved with ``model.save_pretrained(d)`` loads with the plain
``LlamaForCausalLM.from_pretrained(d)`` -- no unexpected or missing keys -- and computes the
trained function: logits equal to 1e-5 (float32; the merge W + B P^T rounds once per entry)."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from tests.distributed.launch import run_distributed  # noqa: E402

pytestmark = pytest.mark.distributed


def test_save_pretrained_round_trip_gives_the_trained_function(tmp_path):
    from tests.distributed import rso_export_workers as w

    got = run_distributed(w.ddp_train_and_export, 2, str(tmp_path / "export"), deadline_s=300)
    r0 = got[0]
    assert r0["b_norm"] > 0  # the last outer iteration's B is not merged into W yet
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        assert not r0["info"].get(key), (key, r0["info"][key])
    assert not any(k.endswith((".B", ".rso_outer")) for k in r0["saved_keys"])
    assert r0["diff"] < 1e-5, r0["diff"]
    # the live model keeps its RSO state (a resume needs W, B and rso_outer apart)
    assert any(k.endswith(".B") for k in r0["live_keys"])


def test_merged_state_dict_needs_rso_layers():
    import torch

    from frugal_dist.optim.rso_export import merged_state_dict

    with pytest.raises(ValueError, match="no RSO layers"):
        merged_state_dict(torch.nn.Linear(3, 2))
