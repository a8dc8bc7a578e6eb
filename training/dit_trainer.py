"""`native4k train-dit`: UltraFlux DiT training on F16 latents from curated shards.

Per micro-batch (one bucket, B images): the frozen F16 VAE encodes the pixels (a sample of its
posterior, then Flux's shift and scale); each image draws a time ``t`` — logit-normal (or
uniform), shifted by the image-token count as Flux's sampler shifts it
(:func:`model.pipeline.resolution_shift`), restricted to the current curriculum stage's band —
and noise ``ε``; the transformer sees the packed ``z_t = (1 − t)·z + t·ε`` with the frozen text
embeddings (from the encoders or the offline cache) and predicts the velocity; the loss is
UltraFlux's SNR-aware Huber wavelet objective (:func:`training.losses.snr_huber_wavelet_loss`)
or plain flow matching.

The curriculum (:class:`training.config.StageConfig`): each stage has a number of steps, an
optional data filter (``select_column``/``select_top`` replace the data config's for that stage,
e.g. the top 5% by ``aesthetic``) and a timestep band (``t_min``/``t_max``, on ``t`` after the
shift). The paper's stage 2 trains timestep indices 0–459 of 1000, read as ``t >= 0.54``: that is
``t_min: 0.54`` only with ``timesteps.shift: none``. Under the default resolution shift
(``s ≈ 25`` at 4096²) 99.9% of the stage-1 draws already have ``t >= 0.54`` (84% at 2048²), so
that band restricts almost nothing; the noisiest 46% of the draws start near ``t = 0.965``.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from model.pipeline import image_ids, pack_latents, resolution_shift, unpack_latents
from model.transformer import UltraFluxTransformer2DModel
from model.vae import AutoencoderKLF16
from training.config import DitModelConfig, DitTrainConfig, TimestepConfig
from training.losses import flow_matching_loss, snr_huber_wavelet_loss
from training.parallel import DistInfo, transformer_blocks
from training.trainer import StepOutput, Trainer

TOKEN_PX = 32  # one transformer token: 16 px (F16 VAE) x 2 (patch)


def timestep_shift(num_tokens: int, cfg: TimestepConfig) -> float:
    """The multiplicative shift ``s`` of ``t' = s·t / (1 + (s − 1)·t)`` for an image size."""
    if cfg.shift == "none":
        return 1.0
    if cfg.shift == "fixed":
        return cfg.fixed_shift
    mu = resolution_shift(
        num_tokens,
        {
            "base_image_seq_len": cfg.base_image_seq_len,
            "max_image_seq_len": cfg.max_image_seq_len,
            "base_shift": cfg.base_shift,
            "max_shift": cfg.max_shift,
        },
    )
    return math.exp(mu)


def sampling_schedule(cfg: TimestepConfig) -> dict[str, Any]:
    """`FlowMatchEulerDiscreteScheduler` settings whose sampling sigmas are shifted as training
    shifted ``t`` (`timestep_shift`): Flux's dynamic shifting through the same points for
    ``resolution``, else its fixed ``shift`` (1: none). FLUX.1-dev's other settings."""
    points = {
        "num_train_timesteps": 1000,
        "base_image_seq_len": cfg.base_image_seq_len,
        "max_image_seq_len": cfg.max_image_seq_len,
        "base_shift": cfg.base_shift,
        "max_shift": cfg.max_shift,
    }
    if cfg.shift == "resolution":
        return {**points, "use_dynamic_shifting": True, "shift": 3.0}
    return {**points, "use_dynamic_shifting": False,
            "shift": cfg.fixed_shift if cfg.shift == "fixed" else 1.0}


def sample_timesteps(
    num: int,
    num_tokens: int,
    cfg: TimestepConfig,
    *,
    t_min: float = 0.0,
    t_max: float = 1.0,
    generator: torch.Generator,
    device: torch.device,
) -> torch.Tensor:
    """Draw ``num`` training times for images of ``num_tokens`` tokens, inside [t_min, t_max].

    The base draw ``u`` (logit-normal or uniform) is mapped through the shift; the band is
    imposed exactly by inverse-CDF sampling of ``u`` between the band's preimages, so the
    distribution inside the band is the unrestricted one, renormalised.

    Returns:
        (num,) float32 times in [max(t_min, eps), min(t_max, 1 − eps)].
    """
    s = timestep_shift(num_tokens, cfg)

    def unshift(t: float) -> float:
        return t / (s - (s - 1) * t)

    def cdf(u: float) -> float:
        if cfg.distribution == "uniform" or u in (0.0, 1.0):
            return u
        z = (math.log(u / (1 - u)) - cfg.logit_mean) / cfg.logit_std
        return 0.5 * math.erfc(-z / math.sqrt(2))

    p_lo, p_hi = cdf(unshift(t_min)), cdf(unshift(t_max))
    p = p_lo + (p_hi - p_lo) * torch.rand(
        num, generator=generator, device=device, dtype=torch.float64
    )
    if cfg.distribution == "uniform":
        u = p
    else:
        u = torch.sigmoid(cfg.logit_mean + cfg.logit_std * torch.special.ndtri(p))
    t = s * u / (1 + (s - 1) * u)
    lo, hi = max(t_min, cfg.eps), min(t_max, 1 - cfg.eps)
    return t.clamp(lo, hi).float()


class _ContiguousGrad(torch.autograd.Function):
    """The identity, whose backward hands a contiguous gradient on."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def contiguous_attention_grads(transformer: nn.Module) -> int:
    """Make the gradient of every single-stream block's attention output contiguous.

    PyTorch (2.11) caches cuDNN attention backward graphs by the layouts of q, k and v only,
    but a graph bakes in the strides of the output's gradient. A double-stream block's is
    contiguous; a single-stream block concatenates the attention output with its MLP
    branch, so that gradient is a slice, rows 15,360 apart instead of 3,072. The two kinds of
    block then share one cached graph and the second kind runs with the first's strides:
    illegal memory accesses, or cuDNN refusing to execute (seen with one block of each kind,
    not with blocks of one kind). One contiguous copy per block and step avoids it.
    Returns the number of blocks changed.
    """
    blocks = getattr(transformer, "single_transformer_blocks", [])
    for block in blocks:
        block.attn.register_forward_hook(lambda module, args, out: _ContiguousGrad.apply(out))
    return len(blocks)


def dit_transformer(m: DitModelConfig, device: torch.device) -> UltraFluxTransformer2DModel:
    """The DiT to train: `m.pretrained`'s, or a random one of `m.architecture` made on
    `device`, switched to `m.rope_method` when that is set."""
    if m.pretrained is not None:
        transformer = UltraFluxTransformer2DModel.from_pretrained(m.pretrained)
    else:
        # Initialised where it trains: on the host, a 12 B model's fp32 init would take
        # 48 GB on every rank before FSDP shards it, and ~2 minutes on 2 cores (1.3 B: 13 s).
        with torch.device(device):
            transformer = UltraFluxTransformer2DModel(**m.architecture)
    if m.rope_method is not None:
        transformer.set_rope_method(m.rope_method)
    return transformer


class DitTask:
    """The DiT side of the shared trainer (see the module docstring).

    Args:
        cfg: The validated configuration.
        loader_factory: Builds a stage's loader from its DataConfig (default: the bucketed
            shard loader, :class:`training.data.BucketedLoader`).
    """

    name = "train-dit"
    evaluates = False  # no held-out metric (see `evaluate`)

    def __init__(self, cfg: DitTrainConfig, *, loader_factory: Any = None) -> None:
        self.cfg = cfg
        self.loader_factory = loader_factory
        self._cache: Any = None  # the text cache, opened once (`text_cache`)
        self._read_captions: dict[tuple[str, str], dict[str, str]] = {}  # (`_captions`)

    def text_cache(self) -> Any:
        """The `TextEmbeddingCache` of `text.cache`, opened on first use (its index is read
        once, for the data checks of every stage and for training)."""
        if self._cache is None:
            from training.text_cache import TextEmbeddingCache

            self._cache = TextEmbeddingCache(self.cfg.text.cache)
        return self._cache

    # -- models ---------------------------------------------------------------------------------

    def build(self, info: DistInfo) -> nn.Module:
        """Transformer (trained, fp32 master weights), frozen VAE and text source on device."""
        cfg, dev = self.cfg, info.device
        self.device = dev
        compute_dtype = torch.bfloat16 if cfg.loop.mixed_precision == "bf16" else torch.float32
        self.transformer = dit_transformer(cfg.model, dev)
        self.transformer.to(dev).train()
        if dev.type == "cuda":
            # SDPA picks cuDNN's kernel by itself at 4K shapes (torch 2.11), and that kernel
            # needs `contiguous_attention_grads`: it runs only when named.
            torch.backends.cuda.enable_cudnn_sdp(cfg.model.attention_backend == "_native_cudnn")
        if cfg.model.attention_backend != "native":
            self.transformer.set_attention_backend(cfg.model.attention_backend)
        if cfg.model.attention_backend == "_native_cudnn":
            contiguous_attention_grads(self.transformer)
        vae_cfg = AutoencoderKLF16.load_config(cfg.model.vae)
        if int(vae_cfg.get("stride", 1)) >= 2:
            self.vae = AutoencoderKLF16.from_pretrained(cfg.model.vae, torch_dtype=compute_dtype)
        else:
            self.vae = AutoencoderKLF16.from_f8(cfg.model.vae, torch_dtype=compute_dtype)
        self.vae.to(dev).eval().requires_grad_(False)
        self.vae_scale = self.vae.config.scaling_factor
        self.vae_shift = self.vae.config.shift_factor or 0.0
        tcfg = self.transformer.config
        if self.vae.config.latent_channels * 4 != tcfg.in_channels:
            raise ValueError(
                f"the VAE has {self.vae.config.latent_channels} latent channels, the transformer "
                f"expects in_channels = 4 x that, got {tcfg.in_channels}"
            )
        if self.vae.spatial_scale_factor != TOKEN_PX // 2:
            raise ValueError(
                f"model.vae compresses {self.vae.spatial_scale_factor}x; "
                "train-dit needs the F16 VAE"
            )
        text = cfg.text
        if text.source == "cache":
            self.cache = self.text_cache()
            self.encoders = None
            seq_dim, pooled_dim = self.cache.meta["seq_dim"], self.cache.meta["pooled_dim"]
            if self.cache.max_sequence_length != text.max_sequence_length:
                raise ValueError(
                    f"text.cache {text.cache} holds {self.cache.max_sequence_length}-token "
                    f"sequences, text.max_sequence_length is {text.max_sequence_length}"
                )
        else:
            from training.text_cache import TextEncoders

            self.cache = None
            self.encoders = TextEncoders(text.encoders, device=dev, dtype=compute_dtype)
            seq_dim, pooled_dim = self.encoders.seq_dim, self.encoders.pooled_dim
        if (seq_dim, pooled_dim) != (tcfg.joint_attention_dim, tcfg.pooled_projection_dim):
            raise ValueError(
                f"text embeddings are {seq_dim} (sequence) / {pooled_dim} (pooled) wide, the "
                f"transformer expects {tcfg.joint_attention_dim} / {tcfg.pooled_projection_dim}"
            )
        return self.transformer

    def blocks(self) -> list[nn.Module]:
        """The double- and single-stream blocks."""
        return transformer_blocks(self.transformer)

    # -- data -----------------------------------------------------------------------------------

    def stage_steps(self) -> list[int]:
        """Steps per curriculum stage."""
        return [st.steps for st in self.cfg.stage_list()]

    def stage_name(self, stage: int) -> str:
        """Name of a stage."""
        return self.cfg.stage_list()[stage].name

    def make_loader(self, stage: int, info: DistInfo) -> Any:
        """The shard loader with the stage's data filter, shuffled by a seed of its own: two
        stages over the same data do not replay the same order."""
        overrides = self.cfg.stage_list()[stage].data_overrides()
        data = dataclasses.replace(self.cfg.data, **overrides,
                                   seed=stage_seed(self.cfg.data.seed, stage))  # fmt: skip
        factory = self.loader_factory
        if factory is None:
            from training.data import BucketedLoader

            factory = BucketedLoader
        try:
            loader = factory(data, rank=info.rank, world_size=info.world_size)
        except ValueError as e:
            if not overrides:
                raise
            said = str(e)  # the stage's own keys, not the data section's, are at fault
            for key in overrides:
                said = said.replace(f"data config key '{key}'", f"stages[{stage}].{key}")
            raise ValueError(f"stage {self.stage_name(stage)!r}: {said}") from e
        self._check_bucket_sizes(data, loader, stage)
        if self.cfg.text.source == "cache":
            self._check_text_cache(data, getattr(loader, "keys", None), stage)
        return loader

    def _check_bucket_sizes(self, data: Any, loader: Any, stage: int) -> None:
        """Before any model is built: every bucket the stage trains on patchifies (sides that
        are multiples of 32 px), not only at its first batch, which may come hours in.

        Raises:
            ValueError: a bucket (of a manifest that breaks the data contract's multiples of 64)
                whose training size is no multiple of 32 px.
        """
        if data.mode != "bucket" or not hasattr(loader, "report"):
            return
        buckets = loader.report().get("buckets", {})
        bad = [f"{b} ({'x'.join(map(str, data.target_size(b)))} px)"
               for b, r in sorted(buckets.items()) if not r.get("dropped")
               and any(side % TOKEN_PX for side in data.target_size(b))]  # fmt: skip
        if bad:
            raise ValueError(
                f"stage {self.stage_name(stage)!r} trains on buckets whose size is not a "
                f"multiple of {TOKEN_PX} px on both sides, which the DiT cannot patchify: "
                f"{', '.join(bad)}; give them weight 0 in data.bucket_weights"
            )

    def _captions(self, root: str, language: str) -> dict[str, str]:
        """Key → caption of the data's kept samples, read from its manifest once per run (every
        stage of a curriculum reads the same data)."""
        from training.text_cache import read_captions

        if (root, language) not in self._read_captions:
            keys, captions = read_captions(root, language)
            self._read_captions[(root, language)] = dict(zip(keys, captions, strict=True))
        return self._read_captions[(root, language)]

    def _check_text_cache(self, data: Any, keys: list[str] | None, stage: int) -> None:
        """Before any model is built: the cache holds this stage's captions, in its language.

        Raises:
            ValueError: the cache's language differs, it lacks samples the stage trains on
                (it was written for other data; a `KeyError` hours into the run otherwise), or
                it was encoded from other captions of those samples (the data re-captioned).
        """
        from training.text_cache import caption_digest

        cache = self.text_cache()
        written_for = cache.meta.get("data")
        if cache.language != data.caption_language:
            raise ValueError(
                f"text.cache {self.cfg.text.cache} holds caption_{cache.language} embeddings, "
                f"data.caption_language is {data.caption_language!r}: rerun native4k "
                f"encode-text with --language {data.caption_language}"
            )
        missing = [k for k in keys or () if k not in cache]
        if missing:
            raise ValueError(
                f"text.cache {self.cfg.text.cache} lacks {len(missing)} of the {len(keys or ())} "
                f"samples stage {self.stage_name(stage)!r} trains on (e.g. {missing[0]!r}); it "
                f"was written for {written_for}: rerun native4k encode-text on {data.root}"
            )
        if cache.digests and keys:  # the same keys with other captions (re-captioned data)
            wanted = set(keys)
            current = self._captions(data.root, data.caption_language)
            stale = [k for k in sorted(wanted) if k in current
                     and cache.digests.get(k) != caption_digest(current[k])]  # fmt: skip
            if stale:
                raise ValueError(
                    f"text.cache {self.cfg.text.cache} was encoded from other captions for "
                    f"{len(stale)} of the {len(wanted)} samples stage {self.stage_name(stage)!r} "
                    f"trains on (e.g. {stale[0]!r}; written for {written_for}): rerun native4k "
                    f"encode-text on {data.root}"
                )

    # -- loss -----------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """(B, 3, H, W) pixels in [-1, 1] → (B, 16, H/16, W/16) scaled latents (float32)."""
        posterior = self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist
        z = posterior.sample(generator=generator)
        return ((z.float() - self.vae_shift) * self.vae_scale).contiguous()

    def text_embeddings(
        self, batch: dict, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Frozen (B, L, D) and (B, P) text embeddings, with caption dropout."""
        num = len(batch["keys"])
        p = self.cfg.text.caption_dropout
        drop = None
        if p > 0:
            drop = (torch.rand(num, generator=generator, device=self.device) < p).tolist()
        if self.cache is not None:
            seq, pooled = self.cache.lookup(batch["keys"], drop=drop)
        else:
            captions = list(batch["captions"])
            if drop is not None:
                captions = ["" if d else c for d, c in zip(drop, captions, strict=True)]
            seq, pooled = self.encoders.encode(captions, self.cfg.text.max_sequence_length)
        # float32 inputs: autocast (bf16) or the fp32 model sets the compute dtype.
        return seq.to(self.device, torch.float32), pooled.to(self.device, torch.float32)

    def compute_loss(
        self, model: nn.Module, batch: dict, stage: int, generator: torch.Generator
    ) -> StepOutput:
        """Flow-matching loss of one bucket batch (see the module docstring)."""
        pixels = batch.get("pixels")
        if pixels is None:
            num_b, _, lat_h, lat_w = batch["latents"].shape
            height, width = lat_h * TOKEN_PX // 2, lat_w * TOKEN_PX // 2
        else:
            num_b, _, height, width = pixels.shape
        if height % TOKEN_PX or width % TOKEN_PX:
            raise ValueError(
                f"bucket {batch.get('bucket')} ({width}x{height} px) is not a multiple of "
                f"{TOKEN_PX} px on both sides: the DiT cannot patchify it"
            )
        rows, cols = height // TOKEN_PX, width // TOKEN_PX
        if "latents" in batch:  # precomputed (B, 16, H/16, W/16) scaled latents: no VAE pass
            latents = batch["latents"].to(self.device, torch.float32)
        else:
            latents = self.encode_pixels(pixels, generator)
        seq, pooled = self.text_embeddings(batch, generator)
        st = self.cfg.stage_list()[stage]
        t = sample_timesteps(
            num_b, rows * cols, self.cfg.timesteps, t_min=st.t_min, t_max=st.t_max,
            generator=generator, device=self.device,
        )  # fmt: skip
        noise = torch.randn(
            latents.shape, generator=generator, device=self.device, dtype=latents.dtype
        )
        t4 = t[:, None, None, None]
        z_t = (1 - t4) * latents + t4 * noise
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((num_b,), self.cfg.model.guidance_scale, device=self.device)
        v_tokens = model(
            hidden_states=pack_latents(z_t),
            timestep=t,
            guidance=guidance,
            pooled_projections=pooled,
            encoder_hidden_states=seq,
            txt_ids=torch.zeros(seq.shape[1], 3, device=self.device),
            img_ids=image_ids(rows, cols, self.device),
            return_dict=False,
        )[0]
        v_pred = unpack_latents(v_tokens, rows, cols)
        lc = self.cfg.loss
        if lc.kind == "snr_huber_wavelet":
            loss = snr_huber_wavelet_loss(
                v_pred, noise, latents, t,
                c_min=lc.c_min, c_max=lc.c_max, gamma=lc.gamma, alpha=lc.alpha, beta=lc.beta,
            )  # fmt: skip
        else:
            loss = flow_matching_loss(v_pred, noise, latents)
        return StepOutput(
            loss=loss,
            num_images=num_b,
            num_tokens=num_b * rows * cols,
        )

    def evaluate(self, model: nn.Module, step: int) -> dict[str, float]:
        """No held-out metric for the DiT (sampling quality needs trained weights)."""
        return {}

    def export(self, state_dict: dict[str, torch.Tensor], folder: Path) -> None:
        """Save the transformer in diffusers layout (``folder/transformer``) and the scheduler
        that samples with the timestep shift it trained with (``folder/scheduler``)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        save_diffusers(self.transformer, state_dict, folder / "transformer")
        scheduler = FlowMatchEulerDiscreteScheduler(**sampling_schedule(self.cfg.timesteps))
        scheduler.save_pretrained(folder / "scheduler")


def stage_seed(seed: int, stage: int) -> int:
    """The data seed of curriculum stage `stage`: `seed` itself for the first stage, a
    different seed drawn from `(seed, stage)` for each later one."""
    if stage == 0:
        return seed
    import numpy as np

    return int(np.random.SeedSequence([seed, stage]).generate_state(1)[0])


def save_diffusers(model: Any, state_dict: dict[str, torch.Tensor], folder: Path) -> None:
    """A diffusers-layout folder (config.json + sharded safetensors) from a full state dict."""
    from huggingface_hub import split_torch_state_dict_into_shards

    from training.text_cache import save_tensors

    folder.mkdir(parents=True, exist_ok=True)
    model.save_config(folder)
    tensors = {k: v.contiguous() for k, v in state_dict.items()}
    split = split_torch_state_dict_into_shards(
        tensors,
        filename_pattern="diffusion_pytorch_model{suffix}.safetensors",
        max_shard_size="10GB",
    )
    for filename, names in split.filename_to_tensors.items():
        save_tensors({n: tensors[n] for n in names}, folder / filename, metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        import json

        (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))


def train_dit(cfg: DitTrainConfig, *, loader_factory: Any = None, stop_after: int | None = None):
    """Run DiT training for a validated config; returns :class:`training.trainer.TrainResult`."""
    from training.config import to_dict

    task = DitTask(cfg, loader_factory=loader_factory)
    trainer = Trainer(
        task, optim=cfg.optim, loop=cfg.loop, parallel=cfg.parallel, config_dict=to_dict(cfg)
    )
    return trainer.run(stop_after=stop_after)
