"""Resumable checkpoints in torch's distributed checkpoint (DCP) format.

A checkpoint is a folder ``<output_dir>/checkpoints/step-00000100/``:

- DCP files (``.metadata``, ``__0_0.distcp`` …) with the trained model, the optimizer state and
  the EMA weights, each rank writing its own shards (FSDP) or rank 0 the replicated tensors
  (DDP, one process); a different number of ranks can read them back;
- ``rank<R>.json``: that rank's step, curriculum stage, LR-schedule state and loader position
  (the sample after the last one trained on), plain JSON;
- ``rng-rank<R>.pt``: that rank's random generator states, tensors only (loaded with
  ``weights_only=True``; nothing is unpickled).

It is written to ``step-….partial`` and renamed once every rank has finished, so a folder
without the suffix is always complete (the next save clears any that a kill left). Resuming
restores all of it, so the next step sees the same batch, noise and timesteps as an
uninterrupted run would (bit-identical on the CPU).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)

from training.parallel import DistInfo, barrier

_PREFIX = "step-"
_OPTIONS = StateDictOptions(ignore_frozen_params=True)
# Loading: the frozen parameters (the VAE's encoder) are not in a checkpoint, so the model's
# own state dict is not matched strictly; every trainable tensor still is (`dcp.load` fails on
# any key of the state it fills that the checkpoint lacks).
_LOAD_OPTIONS = StateDictOptions(ignore_frozen_params=True, strict=False)


@contextlib.contextmanager
def _single_process_quiet() -> Iterator[None]:
    """Without a process group, DCP warns on every save and load that it "assumes the intent
    is to save in a single process": that is this run's intent, so the warning only adds noise
    to a one-process run's log."""
    with warnings.catch_warnings():
        if not (dist.is_available() and dist.is_initialized()):
            warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled")
        yield


@contextlib.contextmanager
def _interrupts_as_such() -> Iterator[None]:
    """Ctrl-C during a save or load: DCP catches the KeyboardInterrupt and raises its own
    CheckpointException (a traceback, exit 1); it is raised again as the interrupt it was."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except CheckpointException as e:
        if any(isinstance(exc, KeyboardInterrupt) for exc, _ in e.failures.values()):
            raise KeyboardInterrupt from e
        raise


def checkpoint_dir(output_dir: str | Path) -> Path:
    """Where a run's checkpoints live."""
    return Path(output_dir) / "checkpoints"


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return None
    return max(_complete(root), key=_step_of, default=None)


def _step_of(folder: Path) -> int:
    return int(folder.name[len(_PREFIX) :])


def newer_checkpoints(folder: str | Path) -> list[Path]:
    """The complete checkpoints beside ``folder`` (a checkpoint) with a later step, oldest
    first: another continuation of the run, when training resumes from ``folder``."""
    folder = Path(folder)
    if not folder.parent.is_dir() or not folder.name[len(_PREFIX) :].isdigit():
        return []
    step = _step_of(folder)
    return sorted((p for p in _complete(folder.parent) if _step_of(p) > step), key=_step_of)


def _complete(root: Path) -> list[Path]:
    """The complete checkpoint folders under ``root``: ``step-<digits>`` exactly (a copy named
    ``step-00000050.bak`` or a ``.partial`` one is not a checkpoint)."""
    return [p for p in root.iterdir()
            if p.is_dir() and p.name.startswith(_PREFIX) and p.name[len(_PREFIX) :].isdigit()]


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: dict[str, torch.Tensor] | None,
    rank_state: dict[str, Any],
    rng_state: dict[str, torch.Tensor],
    info: DistInfo,
    keep: int = 0,
) -> Path:
    """Write a checkpoint for ``step`` (a collective: every rank calls it).

    Args:
        output_dir: The run's output folder.
        step: Optimizer steps done.
        model: The trained module (DDP-wrapped or FSDP-sharded is fine).
        optimizer: Its optimizer.
        ema: EMA tensors by parameter name (sharded like the parameters), or None.
        rank_state: This rank's JSON-serialisable state (stage, loader position, schedule).
        rng_state: This rank's generator states.
        info: This process's place.
        keep: Keep only the newest ``keep`` checkpoints (0: all).

    Returns:
        The checkpoint folder.
    """
    root = checkpoint_dir(output_dir)
    final = root / f"{_PREFIX}{step:08d}"
    partial = final.with_suffix(".partial")
    if info.is_main:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_OPTIONS)
    state = {"model": model_sd, "optim": optim_sd, "ema": dict(ema or {})}
    with _single_process_quiet(), _interrupts_as_such():
        dcp.save(state, checkpoint_id=str(partial))
    (partial / f"rank{info.rank}.json").write_text(
        json.dumps({**rank_state, "world_size": info.world_size}, default=_json_default)
    )
    torch.save({k: v.cpu() for k, v in rng_state.items()}, partial / f"rng-rank{info.rank}.pt")
    barrier()
    if info.is_main:
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        # Saves cut off at other steps (a kill mid-save) are never resumed from: clear them.
        for cut in root.glob(f"{_PREFIX}*.partial"):
            shutil.rmtree(cut, ignore_errors=True)
        if keep > 0:
            done = sorted(_complete(root), key=_step_of)
            for old in done[:-keep]:
                if old != final:  # never the checkpoint just written
                    shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def load_checkpoint(
    folder: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: dict[str, torch.Tensor] | None,
    info: DistInfo,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Restore model, optimizer and EMA in place; return this rank's state and RNG states.

    The state's `ema_restored` is False when an EMA was asked for but the checkpoint holds
    none (a run that turns it on at a resume): ``ema`` is then left as it is.

    Raises:
        FileNotFoundError: ``folder`` is not a complete checkpoint.
        ValueError: It was written by a different number of ranks (loader positions are per
            rank).
    """
    folder = Path(folder)
    if folder.name.endswith(".partial"):
        raise FileNotFoundError(f"{folder} is a checkpoint whose save did not finish")
    meta = folder / f"rank{info.rank}.json"
    if not (folder / ".metadata").is_file() or not meta.is_file():
        raise FileNotFoundError(
            f"{folder} is not a complete checkpoint (no .metadata or {meta.name})"
        )
    rank_state = json.loads(meta.read_text())
    if rank_state.get("world_size") != info.world_size:
        raise ValueError(
            f"{folder} was written by {rank_state.get('world_size')} ranks, this run has "
            f"{info.world_size}: resume with the same number of processes"
        )
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_OPTIONS)
    saved = dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    if ema is not None and not any(k.startswith("ema.") for k in saved):
        ema = None  # a run that turns the EMA on at a resume: the caller starts it afresh
    rank_state["ema_restored"] = ema is not None
    state = {"model": model_sd, "optim": optim_sd, "ema": dict(ema or {})}
    with _single_process_quiet(), _interrupts_as_such():
        dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optim"],
        options=_LOAD_OPTIONS,
    )
    if ema is not None:
        for name, tensor in ema.items():
            loaded = state["ema"][name]
            if loaded is not tensor:
                tensor.copy_(loaded)
    rng = torch.load(folder / f"rng-rank{info.rank}.pt", map_location="cpu", weights_only=True)
    if dist.is_initialized():
        dist.barrier()
    return rank_state, rng
