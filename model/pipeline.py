"""Native-4K text-to-image sampling with the UltraFlux DiT and the F16 VAE.

One transformer token covers 32×32 px (F16 VAE × 2×2 patch), so any bucket whose sides are
multiples of 32 px works: 4096² is 128×128 = 16,384 tokens. Sampling is flow matching with
diffusers' Euler scheduler; the timestep shift grows with the token count (Flux's rule), or is
fixed when ``shift`` is given. Guidance is embedded (FLUX.1-dev style, no second pass).
Text encoders (CLIP-L for the pooled vector, T5 for the sequence) are optional when prompt
embeddings are passed in.

A local folder in diffusers layout loads with :meth:`UltraFluxPipeline.from_folder`:
``transformer/``, ``vae/``, ``scheduler/`` and, optionally, ``text_encoder/``, ``tokenizer/``,
``text_encoder_2/``, ``tokenizer_2/``. Nothing is fetched from a hub.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from model.files import describe_missing, missing_shards
from model.transformer import UltraFluxTransformer2DModel
from model.vae import AutoencoderKLF16

logger = logging.getLogger(__name__)

PATCH_SIZE = 2

FLUX_SCHEDULER_CONFIG: dict[str, Any] = {
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
    "base_shift": 0.5,
    "max_shift": 1.15,
}
"""FLUX.1-dev's `FlowMatchEulerDiscreteScheduler` settings (UltraFlux keeps them)."""


def resolution_shift(num_tokens: int, scheduler_config: Any) -> float:
    """Flux's resolution-dependent shift ``mu`` (the sigmas are shifted by ``exp(mu)``).

    ``mu`` is linear in the number of image tokens through the scheduler's
    (``base_image_seq_len``, ``base_shift``) and (``max_image_seq_len``, ``max_shift``) points
    and extrapolates beyond them (4096² → 16,384 tokens → mu ≈ 3.2 with Flux-dev's settings).
    """
    base_len, max_len, base_shift, max_shift = _shift_points(scheduler_config)
    slope = (max_shift - base_shift) / (max_len - base_len)
    return base_shift + slope * (num_tokens - base_len)


def _setting(scheduler_config: Any, key: str, default: Any) -> Any:
    """One scheduler setting, from a diffusers config (a FrozenDict) or a plain dict."""
    return scheduler_config.get(key, default) if hasattr(scheduler_config, "get") else (
        scheduler_config[key])


def _shift_points(scheduler_config: Any) -> tuple[Any, Any, Any, Any]:
    """(base_image_seq_len, max_image_seq_len, base_shift, max_shift), Flux's defaults."""
    return (_setting(scheduler_config, "base_image_seq_len", 256),
            _setting(scheduler_config, "max_image_seq_len", 4096),
            _setting(scheduler_config, "base_shift", 0.5),
            _setting(scheduler_config, "max_shift", 1.15))  # fmt: skip


MAX_RESOLUTION_SHIFT = 6.9
"""Largest resolution shift `mu` sampling takes: the sigmas are shifted by exp(mu), and past
exp(6.9) ≈ 1000 every step of a 28-step schedule but the last stays above 0.97 (full noise:
the image is never denoised); far past it the schedule is NaN, then an OverflowError."""


def check_resolution_shift(num_tokens: int, scheduler_config: Any, size: str = "") -> float:
    """`resolution_shift`, or a ValueError that says why the size cannot be sampled with it.

    Raises:
        ValueError: the shift extrapolated to `num_tokens` is over `MAX_RESOLUTION_SHIFT`.
    """
    mu = resolution_shift(num_tokens, scheduler_config)
    if _setting(scheduler_config, "time_shift_type", "exponential") != "exponential":
        return mu  # a linear time shift takes mu as the shift itself
    if mu > MAX_RESOLUTION_SHIFT:
        base_len, max_len, base_shift, max_shift = _shift_points(scheduler_config)
        most = "a smaller size"
        if max_shift > base_shift:
            slope = (max_shift - base_shift) / (max_len - base_len)
            tokens = int(base_len + (MAX_RESOLUTION_SHIFT - base_shift) / slope)
            most = f"a size of at most about {tokens} tokens (32x32 px each)"
        raise ValueError(
            f"{size or 'this size'} is {num_tokens} image tokens: the scheduler's resolution "
            f"shift extrapolated there (mu {mu:.1f}) would keep every step but the last at "
            f"full noise; give a fixed --shift, or {most}"
        )
    return mu


def pack_latents(latents_BCHW: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) latents → (B, H/2·W/2, 4C) tokens, each a 2×2 patch (Flux's packing)."""
    b, c, h, w = latents_BCHW.shape
    x = latents_BCHW.reshape(b, c, h // PATCH_SIZE, PATCH_SIZE, w // PATCH_SIZE, PATCH_SIZE)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens_BLD: torch.Tensor, num_rows: int, num_cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents` for a grid of ``num_rows × num_cols`` tokens."""
    b, _, d = tokens_BLD.shape
    c = d // (PATCH_SIZE * PATCH_SIZE)
    x = tokens_BLD.reshape(b, num_rows, num_cols, c, PATCH_SIZE, PATCH_SIZE)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(b, c, num_rows * 2, num_cols * 2)


def image_ids(num_rows: int, num_cols: int, device: torch.device) -> torch.Tensor:
    """(rows·cols, 3) position ids ``(0, row, col)`` of the image tokens."""
    ids = torch.zeros(num_rows, num_cols, 3, device=device)
    ids[..., 1] = torch.arange(num_rows, device=device)[:, None]
    ids[..., 2] = torch.arange(num_cols, device=device)[None, :]
    return ids.reshape(-1, 3)


class UltraFluxPipeline(DiffusionPipeline):
    """Text-to-image at native 4K with an UltraFlux transformer and an F16 VAE.

    Args:
        scheduler: A flow-matching Euler scheduler.
        vae: The F16 VAE.
        transformer: The UltraFlux DiT.
        text_encoder: CLIP text model for the pooled embedding (optional).
        tokenizer: Its tokenizer (optional).
        text_encoder_2: T5 encoder for the sequence embedding (optional).
        tokenizer_2: Its tokenizer (optional).
    """

    model_cpu_offload_seq = "text_encoder->text_encoder_2->transformer->vae"
    _optional_components: ClassVar[list[str]] = [
        "text_encoder",
        "tokenizer",
        "text_encoder_2",
        "tokenizer_2",
    ]

    def __init__(
        self,
        scheduler: FlowMatchEulerDiscreteScheduler,
        vae: AutoencoderKLF16,
        transformer: UltraFluxTransformer2DModel,
        text_encoder: Any = None,
        tokenizer: Any = None,
        text_encoder_2: Any = None,
        tokenizer_2: Any = None,
    ) -> None:
        super().__init__()
        self.register_modules(
            scheduler=scheduler,
            vae=vae,
            transformer=transformer,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
        )
        self.latent_scale_factor = vae.spatial_scale_factor
        # Pixels per transformer token along one side: 16 (VAE) × 2 (patch) = 32.
        self.vae_scale_factor = self.latent_scale_factor * PATCH_SIZE

    # -- loading --------------------------------------------------------------------------------

    @classmethod
    def from_folder(
        cls,
        folder: str | Path,
        *,
        torch_dtype: torch.dtype = torch.bfloat16,
        rope_method: str | None = None,
        load_text_encoders: bool = True,
    ) -> UltraFluxPipeline:
        """Load every component from a local folder in diffusers layout.

        Args:
            folder: Holds ``transformer/``, ``vae/``, ``scheduler/`` and optionally the text
                encoders and tokenizers.
            torch_dtype: Dtype of the networks.
            rope_method: Override the transformer's saved RoPE method. A transformer config
                without RoPE keys (a released UltraFlux or plain Flux folder) runs with
                ``"ultraflux_released"``, as the authors' inference code does.
            load_text_encoders: Skip the text encoders (prompt embeddings will be given).

        Raises:
            FileNotFoundError: A required config or weight file is missing (the message names it).
        """
        root = Path(folder)
        if not root.is_dir():
            raise FileNotFoundError(f"model folder {root} does not exist")
        _require_model_files(root / "transformer", "transformer")
        _require_model_files(root / "vae", "vae")
        scheduler_config = root / "scheduler" / "scheduler_config.json"
        if not scheduler_config.is_file():
            raise FileNotFoundError(
                f"{scheduler_config} not found: copy the scheduler/ folder of the checkpoint "
                "(FlowMatchEulerDiscreteScheduler config) into the model folder"
            )
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(root / "scheduler")
        dit_config = UltraFluxTransformer2DModel.load_config(root / "transformer")
        legacy = {}
        if "rope_method" not in dit_config and "method" not in dit_config:
            # A plain Flux-layout transformer (as UltraFlux releases it): its inference code
            # always applies the released Resonance + NTK-by-parts RoPE.
            legacy = {"method": "yarn"}
        transformer = UltraFluxTransformer2DModel.from_pretrained(
            root / "transformer", torch_dtype=torch_dtype, **legacy
        )
        _require_all_weights(transformer, root / "transformer")
        if rope_method is not None:
            transformer.set_rope_method(rope_method)
        vae = _load_vae(root / "vae", torch_dtype)
        _require_all_weights(vae, root / "vae")
        components: dict[str, Any] = {}
        if load_text_encoders:
            components = _load_text_encoders(root, torch_dtype)
        return cls(scheduler=scheduler, vae=vae, transformer=transformer, **components)

    # -- prompt encoding ------------------------------------------------------------------------

    def encode_prompt(
        self, prompt: list[str], max_sequence_length: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequence (T5) and pooled (CLIP) embeddings of ``prompt``.

        Raises:
            ValueError: The pipeline has no text encoders.
        """
        missing = [
            name
            for name in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
            if getattr(self, name, None) is None
        ]
        if missing:
            raise ValueError(
                f"no {', '.join(missing)} in this pipeline: pass prompt_embeds and "
                "pooled_prompt_embeds, or add the text encoders to the model folder"
            )
        clip_max = getattr(self.tokenizer, "model_max_length", 77)
        clip_max = clip_max if clip_max and clip_max < 10_000 else 77
        clip_ids = self.tokenizer(
            prompt, padding="max_length", max_length=clip_max, truncation=True, return_tensors="pt"
        ).input_ids.to(device)
        pooled = self.text_encoder(clip_ids, output_hidden_states=False).pooler_output
        t5_ids = self.tokenizer_2(
            prompt,
            padding="max_length",
            max_length=max_sequence_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(device)
        sequence = self.text_encoder_2(t5_ids, output_hidden_states=False)[0]
        dtype = self.transformer.dtype
        return sequence.to(dtype), pooled.to(dtype)

    # -- sampling -------------------------------------------------------------------------------

    def timesteps_for(
        self, num_steps: int, num_tokens: int, shift: float | None, device: torch.device
    ) -> torch.Tensor:
        """The timesteps of one sampling run: Flux sigmas, shifted by resolution or by ``shift``."""
        return self._sampling_scheduler(num_steps, num_tokens, shift, device).timesteps

    def _sampling_scheduler(
        self, num_steps: int, num_tokens: int, shift: float | None, device: torch.device
    ) -> FlowMatchEulerDiscreteScheduler:
        """The pipeline's scheduler with its timesteps set, or, for a fixed ``shift``, a copy of
        it with that shift: the pipeline's own scheduler (and the config it saves) is left as it
        is, so a later call without ``shift`` shifts by resolution again."""
        if shift is not None and not (math.isfinite(shift) and shift > 0):
            raise ValueError(f"shift must be a positive number, got {shift}")
        sigmas = np.linspace(1.0, 1.0 / num_steps, num_steps).tolist()
        scheduler = self.scheduler
        if shift is not None:
            scheduler = FlowMatchEulerDiscreteScheduler.from_config(
                scheduler.config, shift=shift, use_dynamic_shifting=False
            )
            scheduler.set_timesteps(sigmas=sigmas, device=device)
        elif scheduler.config.get("use_dynamic_shifting", False):
            mu = check_resolution_shift(num_tokens, scheduler.config)
            scheduler.set_timesteps(sigmas=sigmas, mu=mu, device=device)
        else:
            scheduler.set_timesteps(sigmas=sigmas, device=device)
        return scheduler

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        *,
        height: int = 4096,
        width: int = 4096,
        num_inference_steps: int = 50,
        guidance_scale: float = 4.0,
        prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        max_sequence_length: int = 512,
        shift: float | None = None,
        tiled_decode: bool | None = None,
        output_type: str = "pil",
    ) -> list[Any] | torch.Tensor | np.ndarray:
        """Generate images.

        Args:
            prompt: Text prompt(s); or pass ``prompt_embeds`` and ``pooled_prompt_embeds``.
            height: Image height in px, a multiple of 32.
            width: Image width in px, a multiple of 32.
            num_inference_steps: Euler steps.
            guidance_scale: Embedded guidance (ignored by a model without guidance embedding).
            prompt_embeds: (B, L, joint_attention_dim) T5 embeddings.
            pooled_prompt_embeds: (B, pooled_projection_dim) CLIP pooled embeddings.
            generator: Seeds the initial noise.
            latents: (B, 16, H/16, W/16) initial noise instead of a draw.
            max_sequence_length: T5 tokens (512 for UltraFlux).
            shift: Fixed timestep shift; default is the resolution-dependent one.
            tiled_decode: Partitioned VAE decode; default on above 2048² px.
            output_type: ``"pil"`` (RGB images), ``"np"`` (B, H, W, 3) uint8, ``"pt"``
                (B, 3, H, W) float in [0, 1], or ``"latent"`` (B, 16, H/16, W/16).

        Returns:
            A list of PIL images, an array, or a tensor, by ``output_type``.
        """
        if height <= 0 or width <= 0 or height % 32 or width % 32:
            raise ValueError(
                f"height and width must be positive multiples of 32 px, got {width}x{height}"
            )
        device = self._execution_device
        if prompt_embeds is None:
            if prompt is None:
                raise ValueError("pass a prompt or prompt_embeds + pooled_prompt_embeds")
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            prompt_embeds, pooled_prompt_embeds = self.encode_prompt(
                prompts, max_sequence_length, device
            )
        elif pooled_prompt_embeds is None:
            raise ValueError("prompt_embeds needs pooled_prompt_embeds too")
        dtype = self.transformer.dtype
        prompt_embeds = prompt_embeds.to(device=device, dtype=dtype)
        pooled_prompt_embeds = pooled_prompt_embeds.to(device=device, dtype=dtype)
        batch = prompt_embeds.shape[0]

        num_rows, num_cols = height // self.vae_scale_factor, width // self.vae_scale_factor
        latent_shape = (batch, self.vae.config.latent_channels, 2 * num_rows, 2 * num_cols)
        if latents is None:
            latents = randn_tensor(latent_shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != latent_shape:
            raise ValueError(f"latents must have shape {latent_shape}, got {tuple(latents.shape)}")
        tokens_BLD = pack_latents(latents.to(device=device, dtype=dtype))
        img_ids = image_ids(num_rows, num_cols, device)
        txt_ids = torch.zeros(prompt_embeds.shape[1], 3, device=device)
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((batch,), guidance_scale, device=device, dtype=torch.float32)

        scheduler = self._sampling_scheduler(
            num_inference_steps, num_rows * num_cols, shift, device
        )
        with self.progress_bar(total=len(scheduler.timesteps)) as progress:
            for t in scheduler.timesteps:
                velocity = self.transformer(
                    hidden_states=tokens_BLD,
                    timestep=(t / 1000).expand(batch).to(dtype),
                    guidance=guidance,
                    pooled_projections=pooled_prompt_embeds,
                    encoder_hidden_states=prompt_embeds,
                    txt_ids=txt_ids,
                    img_ids=img_ids,
                    return_dict=False,
                )[0]
                tokens_BLD = scheduler.step(velocity, t, tokens_BLD, return_dict=False)[0]
                progress.update()

        latents = unpack_latents(tokens_BLD, num_rows, num_cols)
        if output_type == "latent":
            return latents
        return self.decode_latents(latents, tiled=tiled_decode, output_type=output_type)

    @torch.no_grad()
    def decode_latents(
        self, latents: torch.Tensor, *, tiled: bool | None = None, output_type: str = "pil"
    ) -> list[Any] | torch.Tensor | np.ndarray:
        """Undo the latent scaling and decode with the F16 VAE (partitioned when ``tiled``)."""
        config = self.vae.config
        latents = latents / config.scaling_factor + (config.shift_factor or 0.0)
        height = latents.shape[-2] * self.latent_scale_factor
        width = latents.shape[-1] * self.latent_scale_factor
        if tiled is None:
            tiled = height * width > 2048 * 2048
        previous = self.vae.use_tiling
        self.vae.use_tiling = tiled
        try:
            image = self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0]
        finally:
            self.vae.use_tiling = previous
        if output_type == "pt":
            return (image.float() / 2 + 0.5).clamp(0, 1)
        # Straight to uint8 in torch: 16.7 MP images make float numpy round trips slow.
        pixels_BHWC = ((image.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        pixels_BHWC = pixels_BHWC.permute(0, 2, 3, 1).cpu().numpy()
        if output_type == "np":
            return pixels_BHWC
        return [Image.fromarray(p) for p in pixels_BHWC]


def _require_model_files(folder: Path, what: str) -> None:
    """Raise one clear error naming the missing config or weight file of a model folder."""
    config = folder / "config.json"
    if not config.is_file():
        raise FileNotFoundError(
            f"{config} not found: the model folder needs the {what}/ subfolder in diffusers "
            f"layout (config.json + diffusion_pytorch_model.safetensors); copy it from the "
            "checkpoint"
        )
    try:
        name = str(json.loads(config.read_text()).get("_class_name", ""))
    except (ValueError, AttributeError) as e:  # not JSON, or not an object
        raise ValueError(f"{config} is not a model config (JSON object): {e}") from e
    expected = {"transformer": "Transformer", "vae": "Autoencoder"}.get(what)
    if expected and name and expected not in name:
        raise ValueError(
            f"{folder} holds a {name}, not a {what}: copy the checkpoint's {what}/ folder there"
        )
    patterns = ("diffusion_pytorch_model*.safetensors", "diffusion_pytorch_model*.bin")
    if not any(any(folder.glob(p)) for p in patterns):
        raise FileNotFoundError(
            f"no weights in {folder}: expected {folder / 'diffusion_pytorch_model.safetensors'} "
            "(or its sharded index); copy the weight files of the checkpoint's "
            f"{what}/ folder there"
        )
    missing = missing_shards(folder)
    if missing:
        raise FileNotFoundError(describe_missing(folder, missing))


def _require_all_weights(model: torch.nn.Module, folder: Path) -> None:
    """Raise when the weight files left tensors unloaded (diffusers keeps them on `meta`)."""
    unloaded = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if unloaded:
        raise ValueError(
            f"the weights in {folder} lack {len(unloaded)} of the model's tensors (e.g. "
            f"{unloaded[0]}): they belong to another model or are incomplete"
        )


def _load_vae(folder: Path, torch_dtype: torch.dtype) -> AutoencoderKLF16:
    """Load an F16 VAE, or convert an F8 one (a config without ``stride``) on the fly."""
    config = AutoencoderKLF16.load_config(folder)
    if int(config.get("stride", 1)) >= 2:
        return AutoencoderKLF16.from_pretrained(folder, torch_dtype=torch_dtype)
    logger.warning("%s holds an F8 VAE; converting it to F16 (stride 2, no retraining)", folder)
    return AutoencoderKLF16.from_f8(folder, torch_dtype=torch_dtype)


def _load_text_encoders(root: Path, torch_dtype: torch.dtype) -> dict[str, Any]:
    """CLIP + T5 encoders and tokenizers if all four subfolders exist, else nothing."""
    names = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    present = [n for n in names if (root / n).is_dir()]
    if not present:
        return {}
    if len(present) != len(names):
        missing = sorted(set(names) - set(present))
        raise FileNotFoundError(
            f"{root} has {', '.join(present)} but not {', '.join(missing)}: copy all four text "
            "encoder/tokenizer folders, or none and pass prompt embeddings"
        )
    from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

    return {
        "text_encoder": CLIPTextModel.from_pretrained(
            root / "text_encoder", torch_dtype=torch_dtype
        ),
        "tokenizer": AutoTokenizer.from_pretrained(root / "tokenizer"),
        "text_encoder_2": T5EncoderModel.from_pretrained(
            root / "text_encoder_2", torch_dtype=torch_dtype
        ),
        "tokenizer_2": AutoTokenizer.from_pretrained(root / "tokenizer_2"),
    }
