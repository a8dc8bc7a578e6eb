"""`native4k train-vae`: decoder-only post-training of the F16 VAE (UltraFlux §3).

The encoder is frozen (it defines the latent space the DiT was trained on); only the decoder
(and a post-quant conv, if the VAE has one) learns. Each batch holds random ``data.crop_size``²
crops of native pixels (the loader's ``crop`` mode; the paper: 512², top 50% by flatness, i.e.
``select_column: flat_fraction``, ``select_top: 0.5``, ``select_ascending: true``). The frozen
encoder gives a latent (a sample of its posterior, or its mode), the decoder reconstructs, and
the loss is ``1.0·L2 + 0.2·wavelet + 0.1·perceptual`` (:class:`training.losses.VaeLoss`) — no
adversarial term.

Held-out images (``eval.images``) are centre-cropped to ``eval.size`` and reconstructed every
``eval.every`` steps and at the end: PSNR over the RGB channels, SSIM (pyiqa's, which measures
the luma channel Y of YCbCr only), and the LPIPS-style distance when the perceptual weights are
configured (LPIPS-vgg proper only with ImageNet VGG16 weights and the LPIPS heads).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from model.vae import AutoencoderKLF16
from training.config import VaeTrainConfig
from training.losses import PerceptualLoss, VaeLoss, psnr
from training.parallel import DistInfo, unwrap
from training.trainer import StepOutput, Trainer


def image_suffixes() -> set[str]:
    """The file suffixes Pillow opens here (AVIF, JPEG 2000, ... where its build reads them)."""
    from PIL import Image

    return {s.lower() for s in Image.registered_extensions()}


class DecoderOnly(nn.Module):
    """The VAE with a trainable decoder: ``forward(latents) -> pixels`` in [-1, 1]-ish."""

    def __init__(self, vae: AutoencoderKLF16) -> None:
        super().__init__()
        self.vae = vae
        vae.requires_grad_(False)
        vae.decoder.requires_grad_(True)
        if vae.post_quant_conv is not None:
            vae.post_quant_conv.requires_grad_(True)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode (B, C, h, w) unscaled latents to (B, 3, 16h, 16w) images."""
        return self.vae.decode(latents).sample


class VaeTask:
    """The VAE side of the shared trainer (see the module docstring).

    Args:
        cfg: The validated configuration.
        loader_factory: Builds the loader from the DataConfig (default:
            :class:`training.data.BucketedLoader`).
    """

    name = "train-vae"

    def __init__(self, cfg: VaeTrainConfig, *, loader_factory: Any = None) -> None:
        self.cfg = cfg
        self.loader_factory = loader_factory
        self.eval_every = cfg.eval.every if cfg.eval.images else 0
        self.evaluates = bool(cfg.eval.images)  # held-out images to measure

    def build(self, info: DistInfo) -> nn.Module:
        """The VAE (decoder trainable), the loss and its perceptual network, the eval images."""
        cfg, dev = self.cfg, info.device
        self.device = dev
        m = cfg.model
        if m.pretrained is not None:
            config = AutoencoderKLF16.load_config(m.pretrained)
            if int(config.get("stride", 1)) >= 2:
                vae = AutoencoderKLF16.from_pretrained(m.pretrained)
            else:
                vae = AutoencoderKLF16.from_f8(m.pretrained)
        else:
            vae = AutoencoderKLF16(**m.architecture)
        self.vae = vae.to(dev)
        self.module = DecoderOnly(self.vae)
        lo = cfg.loss
        self.perceptual = None
        if lo.vgg_weights is not None:
            self.perceptual = PerceptualLoss(lo.vgg_weights, lo.lpips_weights).to(dev)
        self.loss_fn = VaeLoss(
            l2_weight=lo.l2_weight,
            wavelet_weight=lo.wavelet_weight,
            perceptual_weight=lo.perceptual_weight,
            perceptual=self.perceptual,
        )
        self.eval_images = _load_eval_images(cfg.eval.images, cfg.eval.size, cfg.eval.max_images)
        return self.module

    def blocks(self) -> list[nn.Module]:
        """The decoder's mid and up blocks (compiled one by one when compile is on)."""
        dec = self.vae.decoder
        return [dec.mid_block, *dec.up_blocks]

    def stage_steps(self) -> list[int]:
        """One stage over loop.max_steps."""
        return [self.cfg.loop.max_steps]

    def stage_name(self, stage: int) -> str:
        """Name of the stage."""
        return "decoder"

    def make_loader(self, stage: int, info: DistInfo) -> Any:
        """The shard loader (random native-pixel crops)."""
        factory = self.loader_factory
        if factory is None:
            from training.data import BucketedLoader

            factory = BucketedLoader
        return factory(self.cfg.data, rank=info.rank, world_size=info.world_size)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Frozen encoder: (B, 3, H, W) → (B, C, H/16, W/16) unscaled latents."""
        posterior = self.vae.encode(pixels.to(self.device)).latent_dist
        if self.cfg.model.sample_latents and generator is not None:
            return posterior.sample(generator=generator)
        return posterior.mode()

    def compute_loss(
        self, model: nn.Module, batch: dict, stage: int, generator: torch.Generator
    ) -> StepOutput:
        """Reconstruction loss of one crop batch."""
        pixels = batch["pixels"].to(self.device)
        latents = self.encode(pixels, generator)
        recon = model(latents)
        loss, terms = self.loss_fn(recon, pixels)
        num_b, _, h, w = pixels.shape
        return StepOutput(
            loss=loss, metrics=terms, num_images=num_b, num_tokens=num_b * (h // 16) * (w // 16)
        )

    @torch.no_grad()
    def evaluate(self, model: nn.Module, step: int) -> dict[str, float]:
        """Mean PSNR, SSIM (and LPIPS-style distance) of the held-out reconstructions."""
        if not self.eval_images:
            return {}
        import pyiqa

        decoder = unwrap(model)
        was_training = decoder.training
        decoder.eval()
        ssim = pyiqa.create_metric("ssim", device=self.device)
        sums = {"psnr": 0.0, "ssim": 0.0}
        if self.perceptual is not None:
            sums["lpips_vgg"] = 0.0
        for image in self.eval_images:
            x = image.to(self.device)[None]
            recon = decoder(self.encode(x, None)).float().clamp(-1, 1)
            sums["psnr"] += psnr(recon, x).item()
            sums["ssim"] += ssim((recon + 1) / 2, (x + 1) / 2).item()
            if self.perceptual is not None:
                sums["lpips_vgg"] += self.perceptual(recon, x).item()
        decoder.train(was_training)
        return {k: v / len(self.eval_images) for k, v in sums.items()}

    def export(self, state_dict: dict[str, torch.Tensor], folder: Path) -> None:
        """Save the whole VAE (new decoder, frozen encoder) in diffusers layout: folder/vae."""
        from training.dit_trainer import save_diffusers

        full = {k.removeprefix("vae."): v for k, v in state_dict.items()}
        save_diffusers(self.vae, full, folder / "vae")


def _load_eval_images(paths: list[str], size: int, limit: int) -> list[torch.Tensor]:
    """Centre crops (3, size, size) in [-1, 1] of the held-out images.

    Files that are no readable image, or smaller than ``size``, are skipped and counted in
    one printed line.

    Raises:
        ValueError: images were named but none is usable (no metric would ever be computed).
    """
    import numpy as np

    from training.data import decode_image

    files: list[Path] = []
    suffixes = image_suffixes()
    for p in paths:
        path = Path(p)
        if path.is_dir():
            files += sorted(f for f in path.rglob("*") if f.suffix.lower() in suffixes)
        else:
            files.append(path)
    if paths and not files:
        raise ValueError(f"eval.images: no image file in {', '.join(map(str, paths))}")
    out: list[torch.Tensor] = []
    unreadable, small = [], []
    for f in files:
        if len(out) >= limit:
            break
        try:  # decoded as the training batches are: 16-bit grey, alpha, ICC profiles
            rgb = decode_image(f.read_bytes(), f.name)
        except (OSError, ValueError):
            unreadable.append(f.name)
            continue
        h, w = rgb.shape[:2]
        if min(w, h) < size:
            small.append(f.name)
            continue
        left, top = (w - size) // 2, (h - size) // 2
        crop = rgb[top : top + size, left : left + size].astype(np.float32)
        out.append(torch.from_numpy(crop).permute(2, 0, 1) / 127.5 - 1)
    skipped = [f"{len(unreadable)} unreadable ({', '.join(unreadable[:3])})"] if unreadable else []
    skipped += [f"{len(small)} smaller than {size}px ({', '.join(small[:3])})"] if small else []
    if files and not out:
        raise ValueError(f"eval.images: no usable held-out image: {'; '.join(skipped)}")
    if skipped:
        print(f"train-vae: eval.images skipped {'; '.join(skipped)}", flush=True)
    return out


def train_vae(cfg: VaeTrainConfig, *, loader_factory: Any = None, stop_after: int | None = None):
    """Run VAE decoder post-training for a validated config."""
    from training.config import to_dict

    task = VaeTask(cfg, loader_factory=loader_factory)
    trainer = Trainer(
        task, optim=cfg.optim, loop=cfg.loop, parallel=cfg.parallel, config_dict=to_dict(cfg)
    )
    return trainer.run(stop_after=stop_after)
