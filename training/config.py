"""Typed training configurations: one tree per trainer, loaded from YAML and validated up front.

``native4k train-dit --config FILE`` reads a :class:`DitTrainConfig`, ``train-vae`` a
:class:`VaeTrainConfig`. Both nest the loader's :class:`training.data.DataConfig` under ``data``
and share :class:`OptimConfig`, :class:`LoopConfig` and :class:`ParallelConfig`. An unknown key,
a wrong type or contradictory settings raise one :class:`TrainConfigError` naming the key, before
any model is built; files the run needs (weights, caches) are checked here too.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from model.files import describe_missing, missing_shards
from training.data import DataConfig
from training.settings import apply_overrides


class TrainConfigError(ValueError):
    """A training configuration that cannot run; the message names the key."""


def _f(default: Any, help: str) -> Any:
    """A field with a default and its help text."""
    if isinstance(default, list | dict):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass(kw_only=True)
class OptimConfig:
    """AdamW and the learning-rate schedule."""

    lr: float = _f(
        1e-5, "Peak learning rate (paper, VAE decoder: 1e-5 in its text, 1e-4 in its table)."
    )
    betas: list[float] = _f([0.9, 0.999], "AdamW betas.")
    weight_decay: float = _f(1e-2, "AdamW decoupled weight decay.")
    eps: float = _f(1e-8, "AdamW epsilon.")
    grad_clip: float = _f(1.0, "Clip the global gradient norm to this (0: no clipping).")
    warmup_steps: int = _f(0, "Linear warm-up from 0 over this many optimizer steps.")
    schedule: Literal["constant", "cosine", "linear"] = _f(
        "constant", "Decay after warm-up: constant, cosine or linear down to min_lr_ratio."
    )
    min_lr_ratio: float = _f(0.0, "Final learning rate as a fraction of lr (cosine/linear).")


@dataclass(kw_only=True)
class DitOptimConfig(OptimConfig):
    """AdamW and the learning-rate schedule of `train-dit` (the paper's DiT learning rate)."""

    lr: float = _f(1e-6, "Peak learning rate (paper, DiT: 1e-6).")


@dataclass(kw_only=True)
class LoopConfig:
    """The training loop: length, precision, EMA, logging, checkpoints."""

    output_dir: str = _f("train_out", "Checkpoints, TensorBoard logs and the exported model.")
    max_steps: int = _f(0, "Optimizer steps in all (0: the sum of the stages' steps).")
    grad_accum_steps: int = _f(1, "Micro-batches per optimizer step (per rank).")
    seed: int = _f(0, "Seeds the model init, noise and timesteps (each rank offsets it).")
    mixed_precision: Literal["bf16", "no"] = _f(
        "bf16", "bf16 autocast (FSDP: bf16 parameters in compute, fp32 reductions), or fp32."
    )
    ema_decay: float = _f(0.0, "EMA decay of the trained weights (0 disables the EMA).")
    log_every: int = _f(10, "Write scalars to TensorBoard every this many steps.")
    checkpoint_every: int = _f(0, "Save a resumable checkpoint every this many steps (0: at end).")
    keep_checkpoints: int = _f(2, "Keep this many most recent checkpoints (0: keep all).")
    resume: str = _f(
        "auto",
        "'auto': continue from the newest checkpoint in output_dir if one exists; 'never'; or "
        "the path of a checkpoint folder (in output_dir, one with no newer checkpoint beside it: "
        "those of another continuation are refused, not mixed in).",
    )
    device: Literal["auto", "cpu", "cuda"] = _f(
        "auto", "'auto' is CUDA when available (the local rank's GPU), else the CPU."
    )
    tensorboard: bool = _f(True, "Write TensorBoard event files under output_dir/tensorboard.")
    progress: bool = _f(True, "Show a progress bar with images/s and tokens/s (rank 0).")
    export: bool = _f(True, "Save the trained (EMA, if enabled) model in diffusers layout at end.")
    record_samples: bool = _f(
        False,
        "Append the keys of every trained batch to output_dir/samples-rank<R>.txt (one line per "
        "batch): an audit of which samples each rank saw. A resume keeps the lines of the "
        "checkpoint's batches only (those trained past it are trained, and recorded, again).",
    )


@dataclass(kw_only=True)
class ParallelConfig:
    """How the trained model is spread over ranks (applied in this order: AC, compile, shard)."""

    strategy: Literal["none", "ddp", "fsdp"] = _f(
        "none", "'ddp' replicates; 'fsdp' shards parameters, gradients and optimizer state (FSDP2)."
    )
    activation_checkpointing: bool = _f(
        False, "Recompute each transformer block in the backward pass instead of storing it."
    )
    keep_attention: bool = _f(
        False,
        "With activation_checkpointing: keep each block's attention output (PyTorch's SDPA "
        "kernels: output and log-sum-exp, ~0.1 GB per block at 4096²) instead of recomputing "
        "the attention; the rest of the block is still recomputed. Attention is about half of "
        "a 4K block's FLOPs (docs/benchmarks.md).",
    )
    keep_matmuls: bool = _f(
        False,
        "With activation_checkpointing: keep the outputs of each block's matrix products "
        "(every Linear) too, so the backward recomputes only element-wise ops (norms, "
        "modulation, RoPE, GELU): faster, at the memory of those outputs (docs/benchmarks.md).",
    )
    compile: bool = _f(False, "torch.compile each transformer block (regional compilation).")
    reshard_after_forward: bool = _f(
        True, "FSDP: free gathered parameters after forward (ZeRO-3); false keeps them (ZeRO-2)."
    )


@dataclass(kw_only=True)
class DitModelConfig:
    """The DiT and its frozen VAE."""

    pretrained: str | None = _f(
        None, "Transformer folder in diffusers layout (config.json + safetensors) to fine-tune."
    )
    architecture: dict[str, Any] = _f(
        {},
        "UltraFluxTransformer2DModel arguments for a randomly initialised DiT (when no "
        "pretrained folder is given), e.g. a tiny model for tests or a reduced-depth benchmark.",
    )
    vae: str = _f("", "F16 (or F8, converted) VAE folder in diffusers layout; frozen.")
    rope_method: str | None = _f(
        None,
        "The DiT's position method (model.rope.ROPE_METHODS). None: the folder's (or the "
        "architecture's) own; a transformer folder without RoPE keys (plain Flux, or UltraFlux "
        "as released) gets the paper's 'resonance_yarn'. 'ultraflux_released' fine-tunes "
        "UltraFlux's released weights with the RoPE their inference code applies (what "
        "`native4k generate` runs for such a folder).",
    )
    guidance_scale: float = _f(
        1.0, "Embedded guidance value fed during training (models with guidance_embeds)."
    )
    attention_backend: str = _f(
        "native",
        "The transformer's attention kernel, by diffusers' backend name: 'native' (PyTorch's "
        "SDPA chooses, cuDNN excluded; FlashAttention-2 on Hopper), '_native_cudnn' (cuDNN's "
        "attention: a 4096² step 1.3x faster on an H100, docs/benchmarks.md), "
        "'_native_flash', '_native_efficient', 'flex', or a package's kernel when it is "
        "installed ('flash', '_flash_3', 'sage'). Backends fetched from a model hub ('*_hub') "
        "are refused: no hub is reachable.",
    )


@dataclass(kw_only=True)
class TextConfig:
    """Where the text conditioning comes from (encoders and their outputs are frozen)."""

    source: Literal["cache", "encoders"] = _f(
        "cache",
        "'cache': embeddings precomputed by `native4k encode-text`; 'encoders': run the frozen "
        "CLIP-L and T5 from local weights every step.",
    )
    cache: str | None = _f(None, "Folder written by `native4k encode-text` (source: cache).")
    encoders: str | None = _f(
        None,
        "Folder with text_encoder/ (CLIP), tokenizer/, text_encoder_2/ (T5), tokenizer_2/ in "
        "diffusers layout (source: encoders).",
    )
    max_sequence_length: int = _f(512, "T5 tokens per caption (UltraFlux: 512).")
    caption_dropout: float = _f(
        0.0, "Probability of training a sample on the empty caption (for guidance)."
    )


@dataclass(kw_only=True)
class DitLossConfig:
    """The DiT objective."""

    kind: Literal["snr_huber_wavelet", "flow_matching"] = _f(
        "snr_huber_wavelet", "UltraFlux's SNR-aware Huber wavelet loss, or plain flow-matching MSE."
    )
    c_min: float = _f(0.2, "Huber threshold at low SNR.")
    c_max: float = _f(1.0, "Huber threshold at SNR >= gamma.")
    gamma: float = _f(5.0, "SNR cap (not published; our default).")
    alpha: float = _f(0.5, "Exponent of the threshold ramp (not published).")
    beta: float = _f(1.0, "Exponent of the capped SNR in the weight (not published).")


@dataclass(kw_only=True)
class TimestepConfig:
    """How training times t in (0, 1) are drawn (t = 1 is pure noise)."""

    distribution: Literal["logit_normal", "uniform"] = _f(
        "logit_normal", "Base distribution of t before the shift (SD3's logit-normal or uniform)."
    )
    logit_mean: float = _f(0.0, "Mean of the logit-normal.")
    logit_std: float = _f(1.0, "Standard deviation of the logit-normal.")
    shift: Literal["resolution", "fixed", "none"] = _f(
        "resolution",
        "'resolution': Flux's shift exp(mu) with mu linear in the image-token count "
        "(model.pipeline.resolution_shift), as at inference; 'fixed': fixed_shift; 'none'.",
    )
    fixed_shift: float = _f(3.0, "The shift s in t' = s t / (1 + (s - 1) t) when shift: fixed.")
    base_image_seq_len: int = _f(256, "Resolution shift: token count of base_shift.")
    max_image_seq_len: int = _f(4096, "Resolution shift: token count of max_shift.")
    base_shift: float = _f(0.5, "Resolution shift: mu at base_image_seq_len.")
    max_shift: float = _f(1.15, "Resolution shift: mu at max_image_seq_len (extrapolated).")
    eps: float = _f(1e-3, "t is kept inside [eps, 1 - eps] (the loss weight diverges at 0, 1).")


@dataclass(kw_only=True)
class StageConfig:
    """One curriculum stage: its length, a data filter and a timestep band."""

    name: str = _f("stage", "Name shown in logs.")
    steps: int = _f(0, "Optimizer steps of this stage.")
    select_column: str | None = _f(
        None, "Manifest column that filters the data in this stage (None: data's own setting)."
    )
    select_top: float | None = _f(None, "Keep this top fraction by select_column (e.g. 0.05).")
    select_ascending: bool | None = _f(
        None,
        "Rank ascending instead of descending (None: descending when this stage names its own "
        "select_column, else the data's setting).",
    )
    t_min: float = _f(0.0, "Lowest t of this stage (after the shift).")
    t_max: float = _f(
        1.0,
        "Highest t of this stage. The paper's stage 2 (t >= 0.54) is t_min 0.54, t_max 1 with "
        "timesteps.shift: none; the resolution shift puts 99.9% of 4096² draws above 0.54 "
        "(training.dit_trainer's docstring).",
    )

    def data_overrides(self) -> dict[str, Any]:
        """The DataConfig fields this stage replaces. A stage that names its own column ranks it
        descending unless it says otherwise: the data's direction belongs to the data's column
        (the least flat first, say), not to this one."""
        ascending = self.select_ascending
        if ascending is None and self.select_column is not None:
            ascending = False
        pairs = {
            "select_column": self.select_column,
            "select_top": self.select_top,
            "select_ascending": ascending,
        }
        return {k: v for k, v in pairs.items() if v is not None}


@dataclass(kw_only=True)
class DitTrainConfig:
    """`native4k train-dit`: flow matching on F16 latents with the aesthetic curriculum."""

    data: DataConfig
    model: DitModelConfig = field(default_factory=DitModelConfig)
    text: TextConfig = field(default_factory=TextConfig)
    loss: DitLossConfig = field(default_factory=DitLossConfig)
    timesteps: TimestepConfig = field(default_factory=TimestepConfig)
    stages: list[StageConfig] = field(default_factory=list)
    optim: DitOptimConfig = field(default_factory=DitOptimConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def validate(self, *, check_files: bool = True) -> None:
        """Raise :class:`TrainConfigError` for settings that cannot run together."""
        _validate_common(self.optim, self.loop, self.parallel)
        m, tx, ts = self.model, self.text, self.timesteps
        _check(
            (m.pretrained is None) != (not m.architecture),
            "model.pretrained",
            "give exactly one of model.pretrained (a folder) and model.architecture (random init)",
        )
        _check(bool(m.vae), "model.vae", "is required: the F16 VAE folder that encodes pixels")
        if m.architecture:
            from model.transformer import UltraFluxTransformer2DModel

            _check_architecture(m.architecture, UltraFluxTransformer2DModel, "model.architecture")
        _check_attention_backend(m.attention_backend, self.loop.device)
        if m.rope_method is not None:
            from model.rope import ROPE_METHODS

            _check(m.rope_method in ROPE_METHODS, "model.rope_method",
                   f"must be one of {', '.join(ROPE_METHODS)}")
        for key, value in (("text.cache", tx.cache), ("text.encoders", tx.encoders),
                           ("model.vae", m.vae), ("model.pretrained", m.pretrained)):
            _check_local(value, key)
        _check(tx.max_sequence_length > 0, "text.max_sequence_length", "must be positive")
        _check(0 <= tx.caption_dropout < 1, "text.caption_dropout", "must be in [0, 1)")
        if tx.source == "cache":
            _check(tx.cache is not None, "text.cache", "is required when text.source is 'cache'")
        else:
            _check(
                tx.encoders is not None,
                "text.encoders",
                "is required when text.source is 'encoders'",
            )
        _check(0 < ts.eps < 0.5, "timesteps.eps", "must be in (0, 0.5)")
        _check(ts.logit_std > 0, "timesteps.logit_std", "must be positive")
        _check(ts.fixed_shift > 0, "timesteps.fixed_shift", "must be positive")
        _check(ts.base_image_seq_len >= 1, "timesteps.base_image_seq_len", "must be at least 1")
        _check(
            ts.max_image_seq_len > ts.base_image_seq_len,
            "timesteps.max_image_seq_len",
            "must exceed timesteps.base_image_seq_len",
        )
        _check(self.loss.c_max >= self.loss.c_min > 0, "loss.c_min", "need 0 < c_min <= c_max")
        _check(self.loss.gamma > 0, "loss.gamma", "must be positive")
        _check(self.loss.alpha >= 0, "loss.alpha", "must be >= 0")
        _check(self.loss.beta >= 0, "loss.beta", "must be >= 0 (0: no SNR weighting)")
        _check(
            self.data.mode != "crop" or self.data.crop_size % 32 == 0,
            "data.crop_size",
            f"must be a multiple of 32 px (one DiT token) in crop mode, got {self.data.crop_size}",
        )
        for i, st in enumerate(self.stages):
            key = f"stages[{i}]"
            _check(st.steps > 0, f"{key}.steps", "must be positive")
            _check(0 <= st.t_min < st.t_max <= 1, f"{key}.t_min", "need 0 <= t_min < t_max <= 1")
            _check(
                st.t_min < 1 - ts.eps and st.t_max > ts.eps,
                f"{key}.t_min",
                f"the band [{st.t_min}, {st.t_max}] leaves no time inside [timesteps.eps, "
                f"1 - timesteps.eps] = [{ts.eps}, {1 - ts.eps}], where t is kept",
            )
            _check(
                st.select_top is None or 0 < st.select_top <= 1,
                f"{key}.select_top",
                "must be in (0, 1]",
            )
            _check(
                (st.select_column is None) == (st.select_top is None),
                f"{key}.select_column",
                "select_column and select_top go together",
            )
            _check(
                st.select_ascending is None or bool(st.select_column or self.data.select_column),
                f"{key}.select_ascending",
                "ranks a column, but neither the stage nor data.select_column names one",
            )
        if self.stages:
            total = sum(st.steps for st in self.stages)
            _check(
                self.loop.max_steps in (0, total),
                "loop.max_steps",
                f"is {self.loop.max_steps} but the stages add up to {total} steps",
            )
        else:
            _check(self.loop.max_steps > 0, "loop.max_steps", "must be positive (or give stages)")
        if check_files:
            _require_resume_folder(self.loop.resume)
            if m.pretrained is not None:
                _require_model_folder(m.pretrained, "model.pretrained", "Transformer")
            _require_model_folder(m.vae, "model.vae", "Autoencoder")
            if tx.source == "cache":
                _require_file(
                    Path(tx.cache) / "meta.json", "text.cache", "run native4k encode-text"
                )
            else:
                for sub in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"):
                    _require_dir(Path(tx.encoders) / sub, "text.encoders")

    def stage_list(self) -> list[StageConfig]:
        """The stages; without any, one stage of all the data over loop.max_steps."""
        return self.stages or [StageConfig(name="all", steps=self.loop.max_steps)]


@dataclass(kw_only=True)
class VaeModelConfig:
    """The VAE whose decoder is post-trained (the encoder stays frozen)."""

    pretrained: str | None = _f(
        None, "VAE folder in diffusers layout; an F8 Flux VAE is converted to F16 on load."
    )
    architecture: dict[str, Any] = _f(
        {}, "AutoencoderKLF16 arguments for a random VAE when no pretrained folder is given."
    )
    sample_latents: bool = _f(
        True, "Decode a sample of the encoder's distribution (else its mode)."
    )


@dataclass(kw_only=True)
class VaeLossConfig:
    """Decoder loss: l2_weight·L2 + wavelet_weight·wavelet + perceptual_weight·perceptual."""

    l2_weight: float = _f(1.0, "Pixel MSE weight (paper: 1.0).")
    wavelet_weight: float = _f(0.2, "High-frequency Haar sub-band L1 weight (paper: 0.2).")
    perceptual_weight: float = _f(0.1, "LPIPS-style VGG16 term weight (paper: 0.1).")
    vgg_weights: str | None = _f(
        None, "torchvision VGG16 weights file (vgg16-397923af.pth); needed for the perceptual term."
    )
    lpips_weights: str | None = _f(
        None, "LPIPS linear heads (the LPIPS release's vgg.pth); else uniform channel weights."
    )


@dataclass(kw_only=True)
class VaeEvalConfig:
    """Held-out reconstruction metrics (PSNR, SSIM, and LPIPS-style distance with weights) of
    the weights the export saves: the EMA when `loop.ema_decay` > 0, else the trained ones."""

    images: list[str] = _f([], "Image files or folders held out from training.")
    every: int = _f(0, "Evaluate every this many steps (0: only at the end; no images: never).")
    size: int = _f(512, "Centre crop side in px (a multiple of 16).")
    max_images: int = _f(16, "Use at most this many held-out images.")


@dataclass(kw_only=True)
class VaeTrainConfig:
    """`native4k train-vae`: decoder-only post-training of the F16 VAE (no adversarial term)."""

    data: DataConfig
    model: VaeModelConfig = field(default_factory=VaeModelConfig)
    loss: VaeLossConfig = field(default_factory=VaeLossConfig)
    eval: VaeEvalConfig = field(default_factory=VaeEvalConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def validate(self, *, check_files: bool = True) -> None:
        """Raise :class:`TrainConfigError` for settings that cannot run together."""
        _validate_common(self.optim, self.loop, self.parallel)
        m, lo = self.model, self.loss
        _check(
            (m.pretrained is None) != (not m.architecture),
            "model.pretrained",
            "give exactly one of model.pretrained (a folder) and model.architecture (random init)",
        )
        if m.architecture:
            from model.vae import AutoencoderKLF16

            _check_architecture(m.architecture, AutoencoderKLF16, "model.architecture")
        _check(self.loop.max_steps > 0, "loop.max_steps", "must be positive")
        _check(
            min(lo.l2_weight, lo.wavelet_weight, lo.perceptual_weight) >= 0,
            "loss.l2_weight",
            "loss weights must be >= 0",
        )
        _check(
            max(lo.l2_weight, lo.wavelet_weight, lo.perceptual_weight) > 0,
            "loss.l2_weight",
            "and loss.wavelet_weight and loss.perceptual_weight are all 0: there is nothing "
            "to train on (the paper's weights are 1.0, 0.2 and 0.1)",
        )
        _check(
            lo.perceptual_weight == 0 or lo.vgg_weights is not None,
            "loss.vgg_weights",
            "is required when loss.perceptual_weight > 0 (a local VGG16 weight file, e.g. "
            "torchvision's vgg16-397923af.pth; or set loss.perceptual_weight: 0)",
        )
        _check(self.parallel.strategy != "fsdp", "parallel.strategy", "use 'ddp' for the VAE")
        _check(
            self.data.mode == "crop",
            "data.mode",
            "must be 'crop' for train-vae: the decoder post-trains on random data.crop_size² "
            "crops of native pixels (UltraFlux: 512²); 'bucket' mode resizes whole images down",
        )
        _check(self.eval.size > 0 and self.eval.size % 16 == 0, "eval.size", "multiple of 16")
        _check(self.eval.every >= 0, "eval.every", "must be >= 0")
        for key, value in (("model.pretrained", m.pretrained), ("loss.vgg_weights", lo.vgg_weights),
                           ("loss.lpips_weights", lo.lpips_weights),
                           ("eval.images", self.eval.images)):
            _check_local(value, key)
        _check(self.eval.max_images >= 1, "eval.max_images", "must be at least 1")
        if check_files:
            _require_resume_folder(self.loop.resume)
            if m.pretrained is not None:
                _require_model_folder(m.pretrained, "model.pretrained", "Autoencoder")
            if lo.perceptual_weight > 0:
                _require_file(lo.vgg_weights, "loss.vgg_weights", "copy the VGG16 weights here")
            if lo.lpips_weights is not None:
                _require_file(lo.lpips_weights, "loss.lpips_weights", "copy LPIPS's vgg.pth here")
            for img in self.eval.images:
                _check(Path(img).exists(), "eval.images", f"{img} does not exist")


def _validate_common(optim: OptimConfig, loop: LoopConfig, par: ParallelConfig) -> None:
    _check(optim.lr > 0, "optim.lr", "must be positive")
    _check(optim.eps > 0, "optim.eps", "must be positive")
    _check(optim.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    _check(len(optim.betas) == 2, "optim.betas", "must hold two numbers")
    _check(all(0 <= b < 1 for b in optim.betas), "optim.betas", "must be in [0, 1)")
    _check(optim.grad_clip >= 0, "optim.grad_clip", "must be >= 0")
    _check(optim.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
    _check(0 <= optim.min_lr_ratio <= 1, "optim.min_lr_ratio", "must be in [0, 1]")
    _check(loop.max_steps >= 0, "loop.max_steps", "must be >= 0")
    _check(0 <= loop.seed < 2**32, "loop.seed", "must be in [0, 2^32)")  # torch: < 2^64
    _check(bool(str(loop.output_dir).strip()), "loop.output_dir",
           "is empty: name the run's folder (an empty value would write into the current one)")
    _check_output_dir(loop.output_dir)
    _check_local(loop.resume, "loop.resume")
    _check(loop.grad_accum_steps >= 1, "loop.grad_accum_steps", "must be >= 1")
    _check(0 <= loop.ema_decay < 1, "loop.ema_decay", "must be in [0, 1)")
    _check(loop.log_every >= 1, "loop.log_every", "must be >= 1")
    _check(loop.checkpoint_every >= 0, "loop.checkpoint_every", "must be >= 0")
    _check(loop.keep_checkpoints >= 0, "loop.keep_checkpoints", "must be >= 0")
    for keep in ("keep_attention", "keep_matmuls"):  # selective checkpointing
        _check(
            par.activation_checkpointing or not getattr(par, keep),
            f"parallel.{keep}",
            "needs parallel.activation_checkpointing: true (without it every activation is kept)",
        )
    _check(
        not (par.compile and loop.device == "cpu"),
        "parallel.compile",
        "needs a CUDA device (set loop.device: cuda or auto on a GPU machine)",
    )


def _check_local(value: Any, key: str) -> None:
    """A path setting the run reads or writes with the local file system (only `data.root`
    may be an `s3://` prefix): a URL would become a local folder named `s3:`."""
    values = value if isinstance(value, list | tuple) else [value]
    for v in values:
        _check(not (isinstance(v, str) and "://" in v), key,
               f"must be a local path, got {v!r} (only data.root may be a URL; mount the "
               "store or copy the files to this machine)")  # fmt: skip


def _check_output_dir(output_dir: str) -> None:
    """`loop.output_dir` must be a folder the run can create: not a file, nor under one."""
    _check_local(output_dir, "loop.output_dir")
    path = Path(output_dir)
    existing = path
    while not existing.exists() and not existing.is_symlink() and existing.parent != existing:
        existing = existing.parent
    where = "it is a file" if existing == path else f"{existing} is a file"
    _check(existing.is_dir() or not existing.exists(), "loop.output_dir",
           f"must be a folder ({where})")
    _check(not (existing.is_symlink() and not existing.exists()), "loop.output_dir",
           f"cannot be created ({existing} is a link to a path that does not exist)")


ARCHITECTURE_COUNTS = frozenset({"num_layers", "num_single_layers"})
"""Integer arguments of the model classes that may be 0 (a stack left out); every other
integer is a size or a count that must be at least 1."""


def _check_architecture(arch: dict[str, Any], cls: type, key: str) -> None:
    """Every `model.architecture` key is an argument of the model class, with a value of the
    type its annotation names; integer sizes are >= 1 (`ARCHITECTURE_COUNTS` >= 0)."""
    import inspect

    params = {n: p for n, p in inspect.signature(cls.__init__, eval_str=True).parameters.items()
              if n != "self"}  # fmt: skip
    unknown = sorted(set(arch) - set(params))
    _check(not unknown, key,
           f"has unknown key(s) {', '.join(unknown)}; known: {', '.join(params)}")  # fmt: skip
    for name, value in arch.items():
        want = _argument_problem(value, params[name].annotation, name in ARCHITECTURE_COUNTS)
        _check(want is None, f"{key}.{name}", f"must be {want}, got {value!r}")


def _argument_problem(value: Any, annotation: Any, count: bool = False) -> str | None:
    """What `value` should be for a model argument annotated `annotation` (None: it is)."""
    import types
    import typing

    args = typing.get_args(annotation)
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        if value is None and type(None) in args:
            return None
        problems = [_argument_problem(value, a, count) for a in args if a is not type(None)]
        return None if None in problems else " or ".join(p for p in problems if p)
    origin = typing.get_origin(annotation) or annotation
    if origin is bool:
        return None if isinstance(value, bool) else "true or false"
    if origin is int:
        low = 0 if count else 1
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
        return None if ok else f"an integer >= {low}"
    if origin is float:
        ok = (isinstance(value, int | float) and not isinstance(value, bool)
              and math.isfinite(value))  # fmt: skip
        return None if ok else "a finite number"
    if origin is str:
        return None if isinstance(value, str) else "a string"
    if origin is tuple:
        inner = args[0] if args else Any
        if not isinstance(value, list | tuple) or not value:
            return "a non-empty list"
        problems = [_argument_problem(v, inner) for v in value]
        bad = next((p for p in problems if p), None)
        return None if bad is None else f"a list of items each {bad}"
    return None  # a type this check does not know: the model class judges it


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise TrainConfigError(f"config key '{key}' {message}")


CPU_ATTENTION = ("native", "_native_math")
"""Attention backends that run on a CPU (the others are CUDA kernels)."""


def _check_attention_backend(name: str, device: str) -> None:
    """A backend diffusers knows, whose package is installed and that runs on `device`."""
    import torch
    from diffusers.models import attention_dispatch
    from diffusers.models.attention_dispatch import AttentionBackendName

    known = [b.value for b in AttentionBackendName]
    _check(name in known, "model.attention_backend", f"must be one of {', '.join(known)}")
    _check(
        not name.endswith("_hub"),
        "model.attention_backend",
        f"{name!r} downloads its kernel from a model hub, which is not reachable; install the "
        "kernel's package and name its local backend (e.g. '_flash_3' for flash_attn_3)",
    )
    try:  # flash-attn, sageattention, xformers...: the package this backend needs
        attention_dispatch._check_attention_backend_requirements(AttentionBackendName(name))
    except RuntimeError as e:
        raise TrainConfigError(f"config key 'model.attention_backend': {e}") from None
    on_cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    _check(not on_cpu or name in CPU_ATTENTION, "model.attention_backend",
           f"{name!r} is a CUDA kernel and this run is on the CPU; use one of "
           f"{', '.join(CPU_ATTENTION)}")  # fmt: skip


def _require_file(path: str | None, key: str, how: str) -> None:
    if path is None or not Path(path).is_file():
        raise TrainConfigError(f"config key '{key}': file {path} not found ({how})")


def _require_resume_folder(resume: str) -> None:
    """`loop.resume` naming a folder: a complete checkpoint (not one whose save was cut off)."""
    if resume in ("auto", "never"):
        return
    path = Path(resume)
    if path.name.endswith(".partial"):
        raise TrainConfigError(
            f"config key 'loop.resume': {path} is a checkpoint whose save did not finish; name "
            "a complete one (step-<N>, without .partial) or use loop.resume=auto"
        )
    if not (path / ".metadata").is_file():
        raise TrainConfigError(
            f"config key 'loop.resume': {path} is not a checkpoint folder (expected "
            "<output_dir>/checkpoints/step-<N> holding .metadata); or use 'auto' or 'never'"
        )


def _require_dir(path: Path, key: str) -> None:
    if not path.is_dir():
        raise TrainConfigError(f"config key '{key}': folder {path} not found")


def _require_model_folder(folder: str, key: str, kind: str | None = None) -> None:
    """A diffusers model folder whose config names the right kind of model (``kind`` in its
    `_class_name`) and whose safetensors weights can be opened (header only)."""
    root = Path(folder)
    if not (root / "config.json").is_file():
        raise TrainConfigError(
            f"config key '{key}': {root / 'config.json'} not found; name a model folder in "
            "diffusers layout (config.json + diffusion_pytorch_model.safetensors)"
        )
    weights = sorted(root.glob("diffusion_pytorch_model*"))
    if not weights:
        raise TrainConfigError(
            f"config key '{key}': no weights in {root} (expected "
            "diffusion_pytorch_model.safetensors); copy the checkpoint's weight files there"
        )
    try:
        name = str(json.loads((root / "config.json").read_text()).get("_class_name", ""))
    except (ValueError, AttributeError) as e:
        raise TrainConfigError(f"config key '{key}': {root / 'config.json'} is no JSON object"
                               ) from e
    if kind and kind not in name:
        raise TrainConfigError(
            f"config key '{key}': {root} holds a {name or 'model of unknown class'}, not "
            f"an {kind} (the folder of another part?)"
        )
    try:
        missing = missing_shards(root)
    except ValueError as e:
        raise TrainConfigError(f"config key '{key}': {e}") from e
    if missing:
        raise TrainConfigError(f"config key '{key}': {describe_missing(root, missing)}")
    from safetensors import safe_open

    for w in weights:
        if w.suffix != ".safetensors":
            continue
        try:
            with safe_open(str(w), framework="pt"):
                pass
        except Exception as e:
            raise TrainConfigError(
                f"config key '{key}': cannot read the weights file {w} ({e}); copy it again "
                "from the checkpoint"
            ) from e


# ----------------------------------------------------------------------------------------------
# YAML -> dataclasses, with every key and type checked


_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
"""A number in exponent notation, which YAML 1.1 reads as text unless it has a dot."""


def _check_type(value: Any, typ: Any, key: str) -> Any:
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if typ is Any:
        return value
    if dataclasses.is_dataclass(typ):
        return _build(typ, value, key)
    if origin is Literal:
        if value not in args:
            raise TrainConfigError(
                f"config key '{key}' must be one of {', '.join(map(repr, args))}, got {value!r}"
            )
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for t in args:
            try:
                return _check_type(value, t, key)
            except TrainConfigError as e:
                errors.append(str(e))
        raise TrainConfigError(errors[-1] if len(errors) == 1 else f"config key '{key}': {value!r} "
                               f"fits none of {typ}")  # fmt: skip
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise TrainConfigError(f"config key '{key}' must be a list, got {value!r}")
        inner = args[0] if args else Any
        return type(value)(_check_type(v, inner, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise TrainConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        kt, vt = args if args else (Any, Any)
        return {
            _check_type(k, kt, f"{key}.{k}"): _check_type(v, vt, f"{key}.{k}")
            for k, v in value.items()
        }
    if typ is type(None):
        if value is not None:
            raise TrainConfigError(f"config key '{key}' must be null")
        return None
    if typ is bool:
        if not isinstance(value, bool):
            raise TrainConfigError(f"config key '{key}' must be true or false, got {value!r}")
        return value
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TrainConfigError(f"config key '{key}' must be an integer, got {value!r}")
        return value
    if typ is float:
        if isinstance(value, str) and _EXPONENT.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 1e-3 (no dot) as text
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TrainConfigError(f"config key '{key}' must be a number, got {value!r}")
        if not math.isfinite(value):
            raise TrainConfigError(f"config key '{key}' must be a finite number, got {value!r}")
        return float(value)
    if typ is str:
        if not isinstance(value, str):
            raise TrainConfigError(f"config key '{key}' must be a string, got {value!r}")
        return value
    if isinstance(typ, type) and isinstance(value, typ):
        return value
    raise TrainConfigError(f"config key '{key}' has unsupported type {typ}")


def _build(cls: type, data: Any, prefix: str) -> Any:
    if data is None:  # an empty section (`timesteps:` alone, or `--set timesteps=`): defaults
        data = {}
    if not isinstance(data, dict):
        raise TrainConfigError(f"config key '{prefix or '<root>'}' must be a mapping")
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.init]
    names = {f.name for f in fields}
    for k in data:
        if k not in names:
            where = f"{prefix}.{k}" if prefix else str(k)
            raise TrainConfigError(
                f"unknown config key '{where}' (known here: {', '.join(sorted(names))})"
            )
    kwargs = {}
    for f in fields:
        key = f"{prefix}.{f.name}" if prefix else f.name
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise TrainConfigError(f"config key '{key}' is required")
            continue
        kwargs[f.name] = _check_type(data[f.name], hints[f.name], key)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise TrainConfigError(f"config section '{prefix or '<root>'}': {e}") from e


ConfigT = typing.TypeVar("ConfigT", DitTrainConfig, VaeTrainConfig)


def load_train_config(
    cls: type[ConfigT],
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    *,
    data: dict[str, Any] | None = None,
    check_files: bool = True,
) -> ConfigT:
    """Load, type-check and validate a training configuration.

    Args:
        cls: :class:`DitTrainConfig` or :class:`VaeTrainConfig`.
        path: YAML file.
        overrides: ``section.key=value`` strings (values parsed as YAML), applied last;
            ``section.key=`` is the empty string for text and None for an optional setting.
        data: A mapping used instead of (or under) the file, for programmatic use.
        check_files: Check that the named weight files and folders exist.

    Raises:
        TrainConfigError: Unknown key, wrong type, missing file or contradictory settings.
    """
    tree: dict[str, Any] = copy.deepcopy(dict(data or {}))  # overrides never touch `data`
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except OSError as e:
            raise TrainConfigError(f"cannot read config file {path}: {e.strerror}") from e
        except (yaml.YAMLError, UnicodeDecodeError) as e:  # not YAML, or not UTF-8 text
            raise TrainConfigError(f"config file {path} is not valid YAML: {e}") from e
        if loaded is not None and not isinstance(loaded, dict):
            raise TrainConfigError(f"config file {path} must hold a mapping")
        tree.update(loaded or {})
    apply_overrides(tree, overrides, cls, TrainConfigError)
    if cls is VaeTrainConfig and tree.get("data", {}) is None:
        tree["data"] = {}  # an empty `data:` section is its defaults, the crop mode included
    if cls is VaeTrainConfig and isinstance(tree.get("data"), dict):
        # The VAE post-trains on random native-pixel crops: its data mode defaults to `crop`.
        tree["data"].setdefault("mode", "crop")
    cfg = _build(cls, tree, "")
    cfg.validate(check_files=check_files)
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    """The configuration as plain data (written next to checkpoints)."""
    return dataclasses.asdict(cfg)
