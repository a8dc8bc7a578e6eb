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


class DispatchCounts(TorchDispatchMode):
    """Counts the fused attention forward kernels (``count``) and the matrix products
    (``matmuls``) dispatched while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.matmuls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if "scaled_dot_product" in name and "backward" not in name:
            self.count += 1
        if name.split(".")[1] in ("mm", "addmm", "bmm", "baddbmm"):
            self.matmuls += 1
        return func(*args, **(kwargs or {}))


MODES = {  # mode: (activation_checkpointing, keep_attention, keep_matmuls)
    "none": (False, False, False),
    "full": (True, False, False),
    "keep": (True, True, False),
    "keep_mm": (True, True, True),
    "mm_only": (True, False, True),
}


def train_once(mode: str) -> tuple[DispatchCounts, dict[str, torch.Tensor], float]:
    """One forward and backward of a tiny DiT; returns the counts of the ops run in the
    backward, the parameter gradients and the loss."""
    torch.manual_seed(0)
    model = UltraFluxTransformer2DModel(**ARCH)
    ac, keep_attention, keep_matmuls = MODES[mode]
    cfg = ParallelConfig(
        activation_checkpointing=ac, keep_attention=keep_attention, keep_matmuls=keep_matmuls
    )
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    model = parallelize(model, cfg, info, bf16=False)
    inputs = {k: v.float() for k, v in make_inputs(64, 64, 4, ARCH, torch.device("cpu")).items()}
    loss = model(**inputs).sample.square().mean()
    with DispatchCounts() as counter:
        loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return counter, grads, loss.item()


def test_checkpointing_recomputes_what_it_says_and_keeps_the_gradients() -> None:
    """No AC: no attention in the backward; full AC: one recomputed attention per block and
    every forward product again; keep_attention: no attention recomputed; keep_matmuls: no
    product recomputed. The gradients are the same bits in every mode."""
    n_blocks = ARCH["num_layers"] + ARCH["num_single_layers"]
    runs = {mode: train_once(mode) for mode in MODES}
    _, grads, loss = runs["none"]
    attention = {mode: counts.count for mode, (counts, _, _) in runs.items()}
    assert attention == {"none": 0, "full": n_blocks, "keep": 0, "keep_mm": 0, "mm_only": n_blocks}
    matmuls = {mode: counts.matmuls for mode, (counts, _, _) in runs.items()}
    assert matmuls["full"] == matmuls["keep"] > matmuls["none"] > 0
    assert matmuls["keep_mm"] == matmuls["mm_only"] == matmuls["none"]
    assert len(grads) == len(list(UltraFluxTransformer2DModel(**ARCH).parameters()))
    for mode, (_, mode_grads, mode_loss) in runs.items():
        assert mode_loss == loss, mode
        assert mode_grads.keys() == grads.keys(), mode
        for name in grads:
            assert torch.equal(grads[name], mode_grads[name]), (mode, name)


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


@pytest.mark.parametrize("mode", ["full", "keep", "keep_mm"])
def test_checkpointed_blocks_compile_without_falling_back_to_eager(mode: str) -> None:
    """The checkpoint runs inside the compiled block (a `functools.partial` of `checkpoint`
    as `forward` would leave the block uncompiled), and the compiled backward recomputes the
    attention and the products exactly when they are not kept."""
    _, keep_attention, keep_matmuls = MODES[mode]
    from torch._dynamo.utils import counters

    def run(compiled: bool) -> tuple[DispatchCounts, list[torch.Tensor]]:
        torch.manual_seed(0)
        blocks = nn.Sequential(AttentionBlock(), AttentionBlock())
        checkpoint_blocks(blocks, keep_attention=keep_attention, keep_matmuls=keep_matmuls)
        if compiled:
            for block in blocks:
                block.compile(backend="aot_eager")
        x = torch.randn(2, 16, 32, requires_grad=True)
        loss = blocks(x).square().mean()
        with DispatchCounts() as counter:
            loss.backward()
        return counter, [p.grad for p in blocks.parameters()]

    torch._dynamo.reset()
    counters.clear()
    eager, eager_grads = run(compiled=False)
    compiled, compiled_grads = run(compiled=True)
    assert counters["frames"]["ok"] >= 1, dict(counters["frames"])
    assert eager.count == compiled.count == (0 if keep_attention else 2)
    # Backward of 4 Linears: 8 products (input and weight gradients), and when recomputed the
    # qkv product of each block (the backward does not use the output projection's result).
    assert eager.matmuls == compiled.matmuls == (8 if keep_matmuls else 10)
    for a, b in zip(eager_grads, compiled_grads, strict=True):
        torch.testing.assert_close(a, b)
    torch._dynamo.reset()
