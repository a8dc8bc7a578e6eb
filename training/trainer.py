"""The training loop shared by the DiT and VAE trainers.

A :class:`TrainTask` knows its models, its loader per curriculum stage and its loss; the
:class:`Trainer` does the rest, the same way for both: process group and device, the documented
parallelisation order (:mod:`training.parallel`), AdamW with warm-up and decay, bf16 autocast,
gradient accumulation and clipping, an fp32 EMA of the trained weights, TensorBoard scalars, a
progress bar with images/s and tokens/s, and resumable checkpoints (:mod:`training.checkpoint`).
A stop signal (`STOP_SIGNALS`: a cluster's preemption or time limit) ends the run after the
step in progress, with a checkpoint of that step, on every rank at the same step.

Random numbers drawn by a task (noise, timesteps, caption dropout, latent samples) come from the
trainer's own generator (one per rank, seeded from ``loop.seed`` and the rank) and the loader's
position, both saved in every checkpoint, so a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException

from training.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    newer_checkpoints,
    save_checkpoint,
)
from training.config import LoopConfig, OptimConfig, ParallelConfig
from training.folders import replace_folder, staging_folder
from training.parallel import (
    DistInfo,
    all_reduce_mean,
    barrier,
    init_distributed,
    parallelize,
    unwrap,
)

STOP_SIGNALS: tuple[str, ...] = ("SIGTERM", "SIGUSR1")
"""Signals after which a run checkpoints the step in progress and stops: what Kubernetes, torchrun
and Slurm send on preemption or at the end of a job's time (Slurm: `--signal=USR1@120`)."""


@contextlib.contextmanager
def stop_requests() -> Iterator[list[str]]:
    """While open, `STOP_SIGNALS` are recorded (by name, in the list it yields) instead of
    ending the process; the earlier handlers come back when it closes. Off the main thread,
    where Python cannot handle signals, nothing is recorded."""
    got: list[str] = []
    if threading.current_thread() is not threading.main_thread():
        yield got
        return
    previous: dict[int, Any] = {}

    def record(signum: int, frame: Any) -> None:
        got.append(signal.Signals(signum).name)

    for name in STOP_SIGNALS:
        sig = getattr(signal, name, None)
        if sig is not None:
            previous[sig] = signal.signal(sig, record)
    try:
        yield got
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@dataclass
class StepOutput:
    """What a task's loss returns for one micro-batch."""

    loss: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)
    num_images: int = 0
    num_tokens: int = 0


class TrainTask(Protocol):
    """What a trainer needs from the DiT or VAE side (optionally also ``evaluates``: false when
    :meth:`evaluate` measures nothing, so the EMA weights need not be swapped in for it)."""

    name: str

    def build(self, info: DistInfo) -> nn.Module:
        """Build every model on ``info.device``; return the module to train."""

    def blocks(self) -> list[nn.Module]:
        """Repeated blocks to compile and shard."""

    def stage_steps(self) -> list[int]:
        """Optimizer steps of each curriculum stage (their sum is the run's length)."""

    def stage_name(self, stage: int) -> str:
        """A stage's name for logs."""

    def make_loader(self, stage: int, info: DistInfo) -> Any:
        """The loader of a stage (``__iter__``, ``state_dict``, ``load_state_dict``)."""

    def compute_loss(
        self, model: nn.Module, batch: dict, stage: int, generator: torch.Generator
    ) -> StepOutput:
        """Loss of one micro-batch, inside autocast."""

    def evaluate(self, model: nn.Module, step: int) -> dict[str, float]:
        """Held-out metrics (may return nothing)."""

    def export(self, state_dict: dict[str, torch.Tensor], folder: Path) -> None:
        """Save the trained weights (full, on rank 0) in the model's own format."""


def lr_lambda(optim: OptimConfig, total_steps: int):
    """Multiplier of the peak LR at each step: linear warm-up, then constant/cosine/linear."""

    def fn(step: int) -> float:
        if step < optim.warmup_steps:
            return (step + 1) / optim.warmup_steps
        if optim.schedule == "constant":
            return 1.0
        span = max(1, total_steps - optim.warmup_steps)
        frac = min(1.0, (step - optim.warmup_steps) / span)
        decay = 0.5 * (1 + math.cos(math.pi * frac)) if optim.schedule == "cosine" else 1 - frac
        return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * decay

    return fn


@dataclass
class TrainResult:
    """What a finished (or stopped) run reports."""

    step: int
    losses: list[float]
    checkpoint: Path | None
    export: Path | None
    metrics: dict[str, float] = field(default_factory=dict)
    stopped_by: str = ""
    """The stop signal (`STOP_SIGNALS`) that ended the run early, checkpointed; "" if none."""


class Trainer:
    """Runs a :class:`TrainTask` (see the module docstring).

    Args:
        task: The DiT or VAE task.
        optim: Optimizer and schedule.
        loop: Loop settings.
        parallel: Parallelisation settings.
        config_dict: The whole resolved configuration, saved next to the checkpoints.
    """

    def __init__(
        self,
        task: TrainTask,
        *,
        optim: OptimConfig,
        loop: LoopConfig,
        parallel: ParallelConfig,
        config_dict: dict[str, Any] | None = None,
    ) -> None:
        self.task, self.optim_cfg, self.loop, self.par = task, optim, loop, parallel
        self.config_dict = config_dict or {}

    # -- setup ----------------------------------------------------------------------------------

    def setup(self) -> None:
        """Join the process group, check every stage's data, build and parallelise the models,
        the optimizer, schedule, EMA, generator and log writer."""
        loop = self.loop
        self.info = info = init_distributed(loop.device)
        self.stages = self.task.stage_steps()
        self.total_steps = sum(self.stages)
        # Every stage's loader first: a data setting that does not fit stops the run before any
        # model is built.
        self.loaders = [self.task.make_loader(i, info) for i in range(len(self.stages))]
        if info.is_main:
            for i, loader in enumerate(self.loaders):
                if hasattr(loader, "report"):
                    print(f"{self.task.name}: stage {self.task.stage_name(i)!r}: "
                          f"{data_summary(loader.report())}", flush=True)
        torch.manual_seed(loop.seed)  # same init on every rank
        module = self.task.build(info)
        self.bf16 = loop.mixed_precision == "bf16"
        self.model = parallelize(module, self.par, info, bf16=self.bf16, blocks=self.task.blocks())
        self.module = unwrap(self.model)
        self.params = {n: p for n, p in self.module.named_parameters() if p.requires_grad}
        if not self.params:
            raise ValueError(f"{self.task.name}: nothing to train (no parameter requires grad)")
        o = self.optim_cfg
        self.optimizer = torch.optim.AdamW(
            list(self.params.values()),
            lr=o.lr,
            betas=tuple(o.betas),
            eps=o.eps,
            weight_decay=o.weight_decay,
            # The fused kernel on a GPU (docs/benchmarks.md); foreach on the CPU.
            fused=info.device.type == "cuda",
            foreach=info.device.type != "cuda",
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(o, self.total_steps)
        )
        self.ema = (
            {n: p.detach().float().clone() for n, p in self.params.items()}
            if loop.ema_decay > 0
            else None
        )
        self.autocast = torch.autocast(info.device.type, dtype=torch.bfloat16, enabled=self.bf16)
        self.generator = torch.Generator(device=info.device)
        self.generator.manual_seed(loop.seed * 100_003 + info.rank)
        Path(loop.output_dir).mkdir(parents=True, exist_ok=True)
        if info.is_main and self.config_dict:
            import yaml

            saved = Path(loop.output_dir) / "train_config.yaml"
            if saved.is_file() and self._resume_from() is not None:
                changed = _changes(yaml.safe_load(saved.read_text()) or {}, self.config_dict)
                if changed:
                    print(f"{self.task.name}: resuming with changed settings (the optimizer's "
                          "apply from the next step): " + "; ".join(changed), flush=True)
        self.writer = None  # opened in `run`, once the step it continues from is known
        self.micro_batches = 0  # batches trained on this rank (the sample record's lines)

    def _write_config(self) -> None:
        """`train_config.yaml`: this run's settings (written atomically, on the main rank)."""
        if not (self.info.is_main and self.config_dict):
            return
        import yaml

        saved = Path(self.loop.output_dir) / "train_config.yaml"
        tmp = saved.with_name(f".{saved.name}.tmp-{os.getpid()}")
        tmp.write_text(yaml.safe_dump(self.config_dict, sort_keys=False))
        os.replace(tmp, saved)

    def _rng_state(self) -> dict[str, torch.Tensor]:
        state = {"trainer": self.generator.get_state(), "torch": torch.get_rng_state()}
        if self.info.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.info.device)
        return state

    def _set_rng_state(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["trainer"])
        torch.set_rng_state(state["torch"])
        if "cuda" in state and self.info.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"], self.info.device)

    def _check_output_dir(self) -> None:
        """Refuse to start a new run over another run's checkpoints (before anything is written).

        Its checkpoints would outnumber the new run's: pruning would delete each new one as it
        is written, and a later ``resume: auto`` would continue the old run.

        Nor over checkpoints newer than the one ``loop.resume`` names: they are another
        continuation of the run, which pruning would keep instead of the new checkpoints and a
        later ``resume: auto`` would continue.

        Raises:
            ValueError: ``loop.resume`` is not ``auto`` and ``output_dir`` holds a checkpoint
                other than the one named, or one newer than it.
        """
        resume = self.loop.resume
        existing = latest_checkpoint(self.loop.output_dir)
        if resume == "auto" or existing is None:
            return
        if resume != "never" and Path(resume).resolve().parent == existing.parent.resolve():
            newer = newer_checkpoints(Path(resume).resolve())
            if newer:
                raise ValueError(
                    f"loop.resume names {Path(resume).name}, but {existing.parent} also holds "
                    f"newer checkpoints ({', '.join(p.name for p in newer)}) of another "
                    "continuation: move them out of that folder to train on from "
                    f"{Path(resume).name}, or set loop.resume=auto to continue the newest"
                )
            return  # resuming from the newest checkpoint of this very run
        raise ValueError(
            f"loop.output_dir {self.loop.output_dir} already holds another run's checkpoints "
            f"(newest: {existing.name}); with loop.resume={resume!r} choose an empty "
            f"output_dir, remove {existing.parent}, or set loop.resume=auto to continue that run"
        )

    def _rewind_sample_record(self, num_batches: int) -> None:
        """After a resume: the sample record keeps the checkpoint's ``num_batches`` lines only;
        the batches an earlier process trained past it are trained again and recorded again."""
        path = Path(self.loop.output_dir) / f"samples-rank{self.info.rank}.txt"
        if not self.loop.record_samples or not path.is_file():
            return
        lines = path.read_text().splitlines(keepends=True)
        path.write_text("".join(lines[:num_batches]))

    def _apply_optim_settings(self, step: int) -> None:
        """After a resume: the configured AdamW settings, not the checkpoint's.

        A checkpoint restores its optimizer's hyperparameters with its moments, which would
        silently keep an old learning rate a user changed on resume; the same values give the
        same state, so an unchanged resume stays exact.
        """
        o = self.optim_cfg
        lam = lr_lambda(o, self.total_steps)
        self.scheduler.base_lrs = [o.lr for _ in self.optimizer.param_groups]
        for group in self.optimizer.param_groups:
            group.update(initial_lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                         weight_decay=o.weight_decay, lr=o.lr * lam(step))

    def _resume_from(self) -> Path | None:
        resume = self.loop.resume
        if resume == "never":
            return None
        if resume == "auto":
            return latest_checkpoint(self.loop.output_dir)
        path = Path(resume)
        if not path.is_dir():
            raise FileNotFoundError(f"loop.resume names {path}, which is not a checkpoint folder")
        return path

    def _stage_of(self, step: int) -> int:
        acc = 0
        for i, n in enumerate(self.stages):
            acc += n
            if step < acc:
                return i
        return len(self.stages) - 1

    # -- the loop -------------------------------------------------------------------------------

    def train_step(self, next_batch: Any, stage: int) -> tuple[float, float, dict, int, int]:
        """One optimizer step over ``loop.grad_accum_steps`` micro-batches.

        Args:
            next_batch: Returns the next micro-batch.
            stage: The curriculum stage.

        Returns:
            This rank's loss (mean over micro-batches), the gradient norm before clipping, the
            task's metrics, and the images and tokens this rank consumed.
        """
        accum = self.loop.grad_accum_steps
        self.model.train()
        step_loss, metrics, images, tokens = 0.0, {}, 0, 0
        for micro in range(accum):
            batch = next_batch()
            self.micro_batches += 1
            if self.loop.record_samples:
                path = Path(self.loop.output_dir) / f"samples-rank{self.info.rank}.txt"
                with path.open("a") as f:
                    f.write(" ".join(batch["keys"]) + "\n")
            with self._sync_context(micro == accum - 1), self.autocast:
                out = self.task.compute_loss(self.model, batch, stage, self.generator)
            (out.loss / accum).backward()
            step_loss += out.loss.item() / accum
            for k, v in out.metrics.items():
                metrics[k] = metrics.get(k, 0.0) + v / accum
            images += out.num_images
            tokens += out.num_tokens
        grad_norm = self._clip()
        self.step_lr = self.optimizer.param_groups[0]["lr"]  # the rate this step used
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._update_ema()
        return step_loss, grad_norm, metrics, images, tokens

    def run(self, *, stop_after: int | None = None) -> TrainResult:
        """Train until the last stage ends (or ``stop_after`` steps, as an interruption would).

        Returns:
            The step reached, the per-step losses (mean over ranks and micro-batches) of this
            process's run, the last checkpoint and the exported model folder.
        """
        self._check_output_dir()
        self.setup()
        info, loop = self.info, self.loop
        step, epoch, stage = 0, 0, 0
        loader_state = None
        resumed = self._resume_from()
        if resumed is not None:
            try:
                state, rng = load_checkpoint(
                    resumed, model=self.model, optimizer=self.optimizer, ema=self.ema, info=info
                )
            except (RuntimeError, ValueError, KeyError, CheckpointException) as e:
                lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
                why = next((ln for ln in reversed(lines) if "Error" in ln or "key" in ln),
                           lines[-1] if lines else type(e).__name__)  # fmt: skip
                raise ValueError(
                    f"{resumed} does not fit this model or optimizer ({why[:300]}); was "
                    "model.* changed? Train a changed model into a new loop.output_dir"
                ) from e
            step, epoch = state["step"], state["epoch"]
            if self.ema is not None and not state["ema_restored"]:
                with torch.no_grad():  # turned on at this resume: it starts from the weights
                    for name, p in self.params.items():
                        self.ema[name].copy_(p.detach().float())
                if info.is_main:
                    print(f"{self.task.name}: {resumed} holds no EMA (loop.ema_decay was 0); "
                          "the EMA starts from its weights", flush=True)  # fmt: skip
            self.scheduler.load_state_dict(state["scheduler"])
            self._apply_optim_settings(step)
            if state["stage"] == self._stage_of(step):
                loader_state = state["loader"]
            self._set_rng_state(rng)
            self.micro_batches = state.get("micro_batches", step * loop.grad_accum_steps)
            self._rewind_sample_record(self.micro_batches)
            if info.is_main:
                print(f"{self.task.name}: resumed from {resumed} at step {step} (stage "
                      f"{self.task.stage_name(self._stage_of(step))!r})", flush=True)
        else:  # from the start: what a process killed before its first checkpoint recorded
            self._rewind_sample_record(0)  # is trained again, and recorded again
        self._write_config()  # after the checkpoint loaded: the settings this run trains with
        if info.is_main and loop.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # TensorBoard hides what an earlier process logged past the checkpoint (or, from
            # the start, every step it logged): those steps are trained again, one value each.
            self.writer = SummaryWriter(str(Path(loop.output_dir) / "tensorboard"),
                                        purge_step=step + 1)
        stage = self._stage_of(step)
        loader = self.loaders[stage]
        if loader_state is not None:
            try:
                loader.load_state_dict(loader_state)
            except ValueError as err:  # the data or its batching changed since the checkpoint
                if info.is_main:
                    print(f"{self.task.name}: {err}; epoch {loader_state['epoch']} starts "
                          "again over this selection", flush=True)  # fmt: skip
                loader.load_state_dict({"epoch": loader_state["epoch"], "batches_consumed": 0})
        batches = iter(loader)

        def next_batch() -> dict:
            nonlocal batches, epoch
            try:
                return next(batches)
            except StopIteration:
                epoch += 1
                batches = iter(loader)
                try:
                    return next(batches)
                except StopIteration:
                    raise ValueError(f"{self.task.name}: the loader yields no batches") from None

        end = self.total_steps if stop_after is None else min(self.total_steps, stop_after)
        progress = None
        if info.is_main and loop.progress:
            from tqdm import tqdm

            progress = tqdm(total=self.total_steps, initial=step, desc=self.task.name)
        losses: list[float] = []
        last_ckpt: Path | None = None
        window_t0, window_images, window_tokens = time.perf_counter(), 0, 0
        stopped_by = ""
        with stop_requests() as stops:
            while step < end:
                new_stage = self._stage_of(step)
                if new_stage != stage:
                    stage = new_stage
                    loader = self.loaders[stage]
                    batches = iter(loader)
                    if info.is_main:
                        print(f"{self.task.name}: stage {self.task.stage_name(stage)}", flush=True)
                step_loss, grad_norm, metrics, images, tokens = self.train_step(next_batch, stage)
                step += 1
                mean_loss = all_reduce_mean(step_loss, info.device)
                losses.append(mean_loss)
                window_images += images * info.world_size
                window_tokens += tokens * info.world_size
                if not math.isfinite(mean_loss):
                    raise FloatingPointError(
                        f"{self.task.name}: loss is {mean_loss} at step {step}"
                    )
                if step % loop.log_every == 0 or step == end:
                    dt = time.perf_counter() - window_t0
                    rates = {"images_per_s": window_images / dt, "tokens_per_s": window_tokens / dt}
                    self._log(step, mean_loss, grad_norm, {**metrics, **rates}, stage)
                    if progress is not None:
                        progress.set_postfix(
                            loss=f"{mean_loss:.4g}",
                            img_s=f"{rates['images_per_s']:.2f}",
                            tok_s=f"{rates['tokens_per_s']:.3g}",
                        )
                    window_t0, window_images, window_tokens = time.perf_counter(), 0, 0
                if progress is not None:
                    progress.update(1)
                eval_every = getattr(self.task, "eval_every", 0)
                if eval_every and step % eval_every == 0 and step < self.total_steps:
                    scores = self._evaluate(step)
                    self._log_scalars(step, {f"eval/{k}": v for k, v in scores.items()})
                # Every rank must stop at the same step: one of them was signalled, all stop.
                stop = step < end and all_reduce_mean(float(bool(stops)), info.device) > 0
                if (
                    (loop.checkpoint_every and step % loop.checkpoint_every == 0)
                    or step == end
                    or stop
                ):
                    last_ckpt = save_checkpoint(
                        loop.output_dir,
                        step,
                        model=self.model,
                        optimizer=self.optimizer,
                        ema=self.ema,
                        rank_state={
                            "step": step,
                            "epoch": epoch,
                            "stage": stage,
                            "micro_batches": self.micro_batches,
                            "scheduler": self.scheduler.state_dict(),
                            "loader": loader.state_dict(),
                        },
                        rng_state=self._rng_state(),
                        info=info,
                        keep=loop.keep_checkpoints,
                    )
                if stop:
                    stopped_by = stops[0] if stops else "a stop signal to another rank"
                    if info.is_main:
                        print(f"{self.task.name}: {stopped_by}: stopped after step {step}, "
                              f"checkpoint {last_ckpt}", flush=True)
                    break
        if progress is not None:
            progress.close()
        skipped = sum(  # a loader of the caller's own (`loader_factory`) may keep no report
            ld.report().get("skipped", {}).get("samples", 0)
            for ld in self.loaders if hasattr(ld, "report")
        )  # fmt: skip
        skipped = round(all_reduce_mean(float(skipped), info.device) * info.world_size)
        if skipped and info.is_main:
            print(f"{self.task.name}: skipped {skipped} sample(s) that could not be used "
                  "(data.bad_samples=skip; the warnings name them, `native4k verify` finds "
                  "them in the shards)", flush=True)  # fmt: skip
        result = TrainResult(step=step, losses=losses, checkpoint=last_ckpt, export=None,
                             stopped_by=stopped_by)
        if step >= self.total_steps:
            result.metrics = self._evaluate(step)
            if result.metrics:
                self._log_scalars(step, {f"eval/{k}": v for k, v in result.metrics.items()})
            if loop.export:
                result.export = self._export()
        if self.writer is not None:
            self.writer.close()
        return result

    # -- pieces ---------------------------------------------------------------------------------

    @torch.no_grad()
    def _evaluate(self, step: int) -> dict[str, float]:
        """The task's held-out metrics of the weights the export saves: the EMA, when enabled
        (swapped in for the evaluation, then the trained weights are put back). A task whose
        ``evaluates`` is false (the DiT) has nothing to measure: no copy of the weights is made."""
        if self.ema is None or not getattr(self.task, "evaluates", True):
            return self.task.evaluate(self.model, step)
        params = list(self.params.values())
        trained = [p.detach().clone() for p in params]
        try:
            for p, e in zip(params, self.ema.values(), strict=True):
                p.copy_(e)
            return self.task.evaluate(self.model, step)
        finally:
            for p, t in zip(params, trained, strict=True):
                p.copy_(t)

    def _sync_context(self, last_micro: bool):
        """Skip the gradient all-reduce on all but the last micro-batch of a step."""
        if self.par.strategy == "ddp" and not last_micro:
            return self.model.no_sync()
        if self.par.strategy == "fsdp" and self.loop.grad_accum_steps > 1:
            self.model.set_requires_gradient_sync(last_micro)
        return contextlib.nullcontext()

    def _clip(self) -> float:
        params = list(self.params.values())
        max_norm = self.optim_cfg.grad_clip if self.optim_cfg.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        return float(norm)

    @torch.no_grad()
    def _update_ema(self) -> None:
        if self.ema is None:
            return
        ema = list(self.ema.values())
        params = [p.detach().float() for p in self.params.values()]
        torch._foreach_lerp_(ema, params, 1 - self.loop.ema_decay)

    def _log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        if self.writer is not None:
            for k, v in scalars.items():
                self.writer.add_scalar(k, v, step)

    def _log(self, step: int, loss: float, grad_norm: float, metrics: dict, stage: int) -> None:
        lr = self.step_lr
        self._log_scalars(
            step,
            {"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm, "train/stage": stage}
            | {f"train/{k}": v for k, v in metrics.items()},
        )
        if self.info.is_main and not self.loop.progress:
            print(
                f"{self.task.name} step {step}: loss {loss:.5g}, lr {lr:.3g}, "
                f"{metrics['images_per_s']:.2f} images/s, {metrics['tokens_per_s']:.4g} tokens/s",
                flush=True,
            )

    def _export(self) -> Path | None:
        """Gather the full (EMA, if enabled) weights and let the task save them on rank 0."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        full = get_model_state_dict(
            self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        if self.ema is not None:
            for name, tensor in self.ema.items():
                # full_tensor() is a collective (FSDP): every rank gathers, rank 0 keeps.
                value = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
                if self.info.is_main:
                    full[name] = value.detach().cpu().to(full[name].dtype)
        folder = Path(self.loop.output_dir) / "final"
        if self.info.is_main:
            # Built beside it and swapped in: a run killed mid-export leaves the previous
            # `final/` (or none), never a folder of some of the new files. Entries the export
            # does not write (files a user added) are carried over.
            staging = staging_folder(folder)
            try:
                self.task.export(full, staging)
                replace_folder(staging, folder, carry_over=True)  # a user's files stay
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        barrier()
        return folder


def data_summary(report: dict[str, Any]) -> str:
    """One line from a loader's `report()`: what it trains on, and what it padded or dropped."""
    buckets = report.get("buckets", {})
    used = {b: r for b, r in buckets.items() if not r.get("dropped")}
    epoch = report.get("epoch", {})
    line = (f"{sum(r.get('selected', 0) for r in used.values())} samples in {len(used)} "
            f"buckets, {epoch.get('batches_per_rank', '?')} batches per rank per epoch")
    sel = report.get("selection", {})
    if sel.get("column"):
        order = "lowest" if sel.get("ascending") else "top"
        line += (f"; {order} {sel['top'] * 100:.4g}% by {sel['column']}: {sel['selected']} of the "
                 f"{sel['candidates']} with a value")
        if sel.get("without_value"):
            line += f" ({sel['without_value']} without one left out)"
    small = report.get("small_buckets", {})
    if small.get("buckets"):
        line += (f"; small buckets ({small['policy']}, under {small['threshold']}): "
                 + ", ".join(f"{b} ({buckets[b]['selected']})" for b in small["buckets"]))
    dropped = {b: r["dropped"] for b, r in buckets.items() if r.get("dropped")}
    if dropped:
        line += "; dropped: " + ", ".join(f"{b} ({why})" for b, why in sorted(dropped.items()))
    return line


def _changes(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """``key: old → new`` for every setting that differs between two config trees."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changes(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} → {b!r}")
    return out
