"""Activation checkpointing of the trained blocks (`training.parallel.checkpoint_blocks`)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from bench.model_dit_4k import make_inputs
from model.transformer import UltraFluxTransformer2DModel
from training.config import ParallelConfig
from training.parallel import DistInfo, checkpoint_blocks, parallelize, transformer_blocks
from training.tiny import TINY_DIT

ARCH = {**TINY_DIT, "num_layers": 2, "num_single_layers": 2}


class AttentionForwards(TorchDispatchMode):
    """Counts the fused attention forward kernels dispatched while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if "scaled_dot_product" in name and "backward" not in name:
            self.count += 1
        return func(*args, **(kwargs or {}))


def train_once(mode: str) -> tuple[int, dict[str, torch.Tensor], float]:
    """One forward and backward of a tiny DiT; returns the attention forwards run in the
    backward, the parameter gradients and the loss."""
    torch.manual_seed(0)
    model = UltraFluxTransformer2DModel(**ARCH)
    cfg = ParallelConfig(activation_checkpointing=mode != "none", keep_attention=mode == "keep")
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    model = parallelize(model, cfg, info, bf16=False)
    inputs = {k: v.float() for k, v in make_inputs(64, 64, 4, ARCH, torch.device("cpu")).items()}
    loss = model(**inputs).sample.square().mean()
    with AttentionForwards() as counter:
        loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return counter.count, grads, loss.item()


def test_checkpointing_recomputes_what_it_says_and_keeps_the_gradients() -> None:
    """No AC: no attention in the backward; full AC: one recomputed attention per block;
    keep_attention: none recomputed. The gradients are the same bits in all three."""
    n_blocks = ARCH["num_layers"] + ARCH["num_single_layers"]
    plain, grads, loss = train_once("none")
    full, full_grads, full_loss = train_once("full")
    keep, keep_grads, keep_loss = train_once("keep")
    assert (plain, full, keep) == (0, n_blocks, 0)
    assert loss == full_loss == keep_loss
    assert grads.keys() == full_grads.keys() == keep_grads.keys()
    assert len(grads) == len(list(UltraFluxTransformer2DModel(**ARCH).parameters()))
    for name in grads:
        assert torch.equal(grads[name], full_grads[name]), name
        assert torch.equal(grads[name], keep_grads[name]), name


def test_checkpointing_leaves_parameter_names_alone() -> None:
    """The wrapper changes `forward` only: state dict keys (checkpoints, exports) stay."""
    torch.manual_seed(0)
    model = UltraFluxTransformer2DModel(**ARCH)
    keys = list(model.state_dict())
    assert checkpoint_blocks(transformer_blocks(model), keep_attention=True) == 4
    assert list(model.state_dict()) == keys


class AttentionBlock(nn.Module):
    """A block small enough to compile in seconds: projection, SDPA, projection."""

    def __init__(self, width: int = 32, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, w = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        y = nn.functional.scaled_dot_product_attention(q, k, v)
        return x + self.out(y.transpose(1, 2).reshape(b, s, w))


@pytest.mark.parametrize("keep_attention", [False, True])
def test_checkpointed_blocks_compile_without_falling_back_to_eager(keep_attention: bool) -> None:
    """The checkpoint runs inside the compiled block (a `functools.partial` of `checkpoint`
    as `forward` would leave the block uncompiled), and the compiled backward recomputes the
    attention exactly when it is not kept."""
    from torch._dynamo.utils import counters

    def run(compiled: bool) -> tuple[int, list[torch.Tensor]]:
        torch.manual_seed(0)
        blocks = nn.Sequential(AttentionBlock(), AttentionBlock())
        checkpoint_blocks(blocks, keep_attention=keep_attention)
        if compiled:
            for block in blocks:
                block.compile(backend="aot_eager")
        x = torch.randn(2, 16, 32, requires_grad=True)
        loss = blocks(x).square().mean()
        with AttentionForwards() as counter:
            loss.backward()
        return counter.count, [p.grad for p in blocks.parameters()]

    torch._dynamo.reset()
    counters.clear()
    eager_count, eager_grads = run(compiled=False)
    compiled_count, compiled_grads = run(compiled=True)
    assert counters["frames"]["ok"] >= 1, dict(counters["frames"])
    assert eager_count == compiled_count == (0 if keep_attention else 2)
    for a, b in zip(eager_grads, compiled_grads, strict=True):
        torch.testing.assert_close(a, b)
    torch._dynamo.reset()
