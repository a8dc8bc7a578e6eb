"""Process group, device, and the one order in which a trained model is parallelised.

Launch with ``torchrun --nproc-per-node N -m pipelines.cli train-dit --config FILE`` (or plain
``native4k train-dit`` for one process). NCCL on CUDA, gloo on the CPU.

:func:`parallelize` applies, in this order (torchtitan's):

1. **activation checkpointing** — each block's ``forward`` runs under non-reentrant
   ``torch.utils.checkpoint`` (:func:`checkpoint_blocks`) and is recomputed in backward, all of
   it, or all but the attention kernels' outputs (``keep_attention``) and the matrix products'
   (``keep_matmuls``): selective checkpointing;
2. **torch.compile** — each transformer block compiled on its own (regional compilation: one
   graph per block type, reused across the repeated blocks);
3. **sharding** — FSDP2 (``fully_shard``) on every block, then on the root module, with bf16
   parameters in compute and fp32 gradient reduction when bf16 is on; or DDP on the whole module.

The checkpoint sits inside the block's ``forward``, so it is inside the compiled region (the
compiler sees which activations are recomputed and may fuse the recompute) and inside FSDP's
hooks: a block's parameters are gathered once for its backward, recompute included (the
layering torchtitan uses).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

from training.config import ParallelConfig


@dataclass(frozen=True, kw_only=True)
class DistInfo:
    """Where this process sits: rank, world size, local rank and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the rank that logs and writes single files)."""
        return self.rank == 0


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group torchrun describes (``RANK``/``WORLD_SIZE``), pick the device.

    Args:
        device: ``"auto"`` (the local rank's GPU when CUDA is available, else CPU), ``"cpu"``
            or ``"cuda"``.

    Raises:
        ValueError: ``"cuda"`` where no CUDA device is visible (a user's setting: the CLI
            prints it as one line).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "config key 'loop.device' is 'cuda' but no CUDA device is visible (use 'auto' or "
            "'cpu')"
        )
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            timeout=datetime.timedelta(minutes=30),
            device_id=dev if use_cuda else None,
        )
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    if dist.is_initialized():
        dist.barrier()


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a Flux-layout DiT (double then single), or a VAE decoder's."""
    blocks: list[nn.Module] = []
    for name in ("transformer_blocks", "single_transformer_blocks"):
        blocks.extend(getattr(model, name, None) or [])
    return blocks


def parallelize(
    model: nn.Module,
    cfg: ParallelConfig,
    info: DistInfo,
    *,
    bf16: bool,
    blocks: Iterable[nn.Module] | None = None,
) -> nn.Module:
    """Apply activation checkpointing, compilation and sharding to ``model`` (module docstring).

    Args:
        model: The module whose parameters are trained, already on ``info.device``.
        cfg: What to apply.
        info: This process's place.
        bf16: Shard with bf16 compute parameters (FSDP only; autocast does the rest).
        blocks: The repeated blocks to compile and shard (default: :func:`transformer_blocks`).

    Returns:
        The module to call in training (the DDP wrapper, or ``model`` itself, sharded in place).
    """
    blocks = list(blocks) if blocks is not None else transformer_blocks(model)
    if cfg.activation_checkpointing:
        if not blocks:
            raise ValueError(f"{type(model).__name__} has no blocks to checkpoint")
        checkpoint_blocks(blocks, keep_attention=cfg.keep_attention, keep_matmuls=cfg.keep_matmuls)
    if cfg.compile:
        for block in blocks:
            block.compile()
    if cfg.strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if not dist.is_initialized():
            # One process: FSDP2 still runs (a mesh of one), so the path is testable anywhere.
            _init_single_process_group(info)
        mesh = init_device_mesh(info.device.type, (dist.get_world_size(),))
        # Inputs are not cast by FSDP: autocast sets the compute dtype, as it does without
        # FSDP, so the sharded and unsharded models compute alike.
        mp = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16 if bf16 else None,
            reduce_dtype=torch.float32,
            cast_forward_inputs=False,
        )
        for block in blocks:
            fully_shard(
                block, mesh=mesh, mp_policy=mp, reshard_after_forward=cfg.reshard_after_forward
            )
        fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=cfg.reshard_after_forward)
        return model
    if cfg.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        if not dist.is_initialized():
            _init_single_process_group(info)
        ids = [info.device.index] if info.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    return model


def _attention_ops() -> frozenset[Any]:
    """PyTorch's fused attention kernels (what SDPA dispatches to), where this build has them."""
    names = (
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_fused_attention_overrideable",
    )
    aten = torch.ops.aten
    return frozenset(getattr(aten, n).default for n in names if hasattr(aten, n))


_ATTENTION_OPS = _attention_ops()
# The matrix products a ``Linear`` (and a batched product) dispatches to.
_MATMUL_OPS = frozenset(
    getattr(torch.ops.aten, n).default for n in ("mm", "addmm", "bmm", "baddbmm")
)


@dataclass(frozen=True)
class _KeepPolicy:
    """Selective checkpointing: save the outputs of ``ops``, recompute everything else."""

    ops: frozenset[Any]

    def __call__(self, ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
        if op in self.ops:
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE


def checkpoint_blocks(
    blocks: Iterable[nn.Module], *, keep_attention: bool = False, keep_matmuls: bool = False
) -> int:
    """Run each block's ``forward`` under non-reentrant activation checkpointing.

    Args:
        blocks: The modules to checkpoint (their ``forward`` is wrapped in place: parameter
            names and state dicts are unchanged).
        keep_attention: Save the outputs of PyTorch's fused attention kernels (output and
            log-sum-exp) instead of recomputing them.
        keep_matmuls: Save the outputs of the matrix products (every ``Linear``): the backward
            then recomputes only the cheap element-wise ops (norms, modulation, RoPE, GELU),
            at the memory cost of the products' outputs.

    With neither, everything is recomputed (full checkpointing).

    Returns:
        The number of blocks wrapped.
    """
    # Full checkpointing passes no context_fn: torch 2.11's compiler refuses an explicit
    # `noop_context_fn` ("checkpoint not implemented for ... context_fn").
    options: dict[str, Any] = {"use_reentrant": False}
    kept = (_ATTENTION_OPS if keep_attention else frozenset()) | (
        _MATMUL_OPS if keep_matmuls else frozenset()
    )
    if kept:
        policy = _KeepPolicy(kept)
        options["context_fn"] = partial(create_selective_checkpoint_contexts, policy)
    blocks = list(blocks)
    for block in blocks:
        block.forward = _checkpointed(block.forward, options)
    return len(blocks)


def _checkpointed(forward: Callable[..., Any], options: dict[str, Any]) -> Callable[..., Any]:
    # A plain function of this module, not a partial of `checkpoint`: torch.compile does not
    # start tracing inside torch.utils.checkpoint, only when a traced frame calls it.
    def checkpointed_forward(*args: Any, **kwargs: Any) -> Any:
        return checkpoint(forward, *args, **options, **kwargs)

    return checkpointed_forward


def _init_single_process_group(info: DistInfo) -> None:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    dist.init_process_group(
        backend="nccl" if info.device.type == "cuda" else "gloo", rank=0, world_size=1
    )


def unwrap(model: nn.Module) -> nn.Module:
    """The module under a DDP wrapper (FSDP2 shards in place: nothing to unwrap)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def all_reduce_mean(value: float, device: torch.device) -> float:
    """Mean of a Python float over ranks (the value itself in one process)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).item()
