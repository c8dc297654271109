"""RSO under DDP all-reduces only what is trainable: B (out x r per layer) instead of W (out x n),
plus the untouched parameters. Bytes are counted by a DDP communication hook on 2 gloo ranks and
compared with the prediction from the shapes."""

from __future__ import annotations

import pytest
import torch

from tests.distributed.launch import run_distributed

pytestmark = pytest.mark.distributed


def _count_allreduce_bytes(rank: int, world: int, use_rso: bool) -> dict[str, int]:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from frugal_dist.optim.rso_layers import apply_rso, rso_layers
    from frugal_dist.train.model import build_model

    torch.manual_seed(0)
    model = build_model("tiny", max_seq_len=16, n_layers=2)
    dense = sum(p.numel() for p in model.parameters())
    if use_rso:
        apply_rso(model, density=0.25, seed=0)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    b_elems = sum(layer.B.numel() for layer in rso_layers(model).values()) if use_rso else 0
    w_elems = sum(layer.weight.numel() for layer in rso_layers(model).values()) if use_rso else 0
    sent = [0]

    def hook(state, bucket):
        sent[0] += bucket.buffer().numel() * bucket.buffer().element_size()
        fut = dist.all_reduce(bucket.buffer(), async_op=True).get_future()
        return fut.then(lambda f: f.value()[0] / world)

    ddp = DDP(model)
    ddp.register_comm_hook(None, hook)
    batch = torch.randint(0, 257, (2, 16), generator=torch.Generator().manual_seed(rank))
    _, loss = ddp(batch, labels=batch)
    loss.backward()
    return {"sent": sent[0], "dense": dense, "trainable": trainable, "b": b_elems, "w": w_elems}


def test_rso_all_reduces_b_not_w():
    dense = run_distributed(_count_allreduce_bytes, 2, False)[0]
    rso = run_distributed(_count_allreduce_bytes, 2, True)[0]
    assert dense["sent"] == 4 * dense["dense"]  # float32 gradients of every parameter
    # RSO: the dense count minus every targeted W, plus every B (= r/n of W: density 0.25)
    assert rso["sent"] == 4 * rso["trainable"]
    assert rso["trainable"] == dense["dense"] - rso["w"] + rso["b"]
    assert rso["b"] * 4 == rso["w"]  # r = n/4 columns per targeted layer
    assert rso["sent"] < dense["sent"]
