"""Training objectives: UltraFlux's SNR-aware Huber wavelet loss and the VAE decoder loss.

Flow matching convention (as in diffusers' Flux): ``z_t = (1 − t)·z + t·ε`` with ``t`` in (0, 1),
``t = 1`` pure noise; the model predicts the velocity ``v ≈ ε − z``, so ``ẑ = z_t − t·v`` is its
estimate of the clean latent.

:func:`snr_huber_wavelet_loss` is the shared reference's formula (``ultraflux.md`` §3), term by
term. Its limit for ``c → ∞`` and ``β = 0`` is *not* plain flow matching as written there, but
plain flow matching re-weighted per sample: because the Haar transform is orthonormal and linear,
``W(ẑ) − W(z) = W(ẑ − z) = −t·W(v − (ε − z))`` keeps the sum of squares, and ``ρ_c(r) → r²/2``,
so the loss tends to ``mean_b[ t_b³ / (2(1 − t_b)) · mean((v_b − (ε_b − z_b))²) ]`` — the
per-sample flow-matching MSE times ``t³ / (2(1 − t))`` (:func:`flow_matching_limit` returns it;
a test checks it).

The VAE loss (:class:`VaeLoss`) is ``λ_l2·L2 + λ_wav·wavelet + λ_perc·perceptual`` with the
paper's defaults 1 / 0.2 / 0.1 and no adversarial term. The perceptual term is LPIPS-style
(:class:`PerceptualLoss`): torchvision's VGG16 features at five depths, unit-normalised over
channels, squared differences, weighted per channel (LPIPS's linear heads when their file is
given, else uniformly), averaged over space and summed over depths. Weights come from local
files only.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def haar_dwt(x_BCHW: torch.Tensor) -> torch.Tensor:
    """One-level orthonormal 2-D Haar transform, the four sub-bands stacked on channels.

    Args:
        x_BCHW: (B, C, H, W) with even H and W.

    Returns:
        (B, 4C, H/2, W/2): ``[LL, LH, HL, HH]`` blocks of C channels each. Orthonormal: the sum
        of squares is preserved and the transform is its own inverse up to re-packing.
    """
    _, _, h, w = x_BCHW.shape
    if h % 2 or w % 2:
        raise ValueError(f"the Haar transform needs even height and width, got {h}x{w}")
    a = x_BCHW[:, :, 0::2, 0::2]
    bb = x_BCHW[:, :, 0::2, 1::2]
    cc = x_BCHW[:, :, 1::2, 0::2]
    d = x_BCHW[:, :, 1::2, 1::2]
    ll = (a + bb + cc + d) / 2
    lh = (a - bb + cc - d) / 2  # horizontal detail (differences along W)
    hl = (a + bb - cc - d) / 2  # vertical detail (differences along H)
    hh = (a - bb - cc + d) / 2
    return torch.cat([ll, lh, hl, hh], dim=1)


def snr(t: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio ``(1 − t)² / t²`` of ``z_t = (1 − t)·z + t·ε``."""
    return (1 - t).square() / t.square()


def huber_threshold(
    t: torch.Tensor, *, c_min: float, c_max: float, gamma: float, alpha: float
) -> torch.Tensor:
    """``c(t) = c_min + (c_max − c_min)·(min(SNR(t), γ)/γ)^α``."""
    return c_min + (c_max - c_min) * (snr(t).clamp(max=gamma) / gamma) ** alpha


def loss_weight(t: torch.Tensor, *, gamma: float, beta: float) -> torch.Tensor:
    """``ω(t) = t/(1 − t)·min(SNR(t), γ)^β``."""
    return t / (1 - t) * snr(t).clamp(max=gamma) ** beta


def pseudo_huber(r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``ρ_c(r) = c²(√(1 + (r/c)²) − 1)``, computed as ``r² / (√(1 + (r/c)²) + 1)``.

    The two are equal; the second form has no cancellation for large ``c`` (it tends to r²/2).
    """
    return r.square() / (torch.sqrt(1 + (r / c).square()) + 1)


def snr_huber_wavelet_loss(
    v_pred: torch.Tensor,
    noise: torch.Tensor,
    latents: torch.Tensor,
    t: torch.Tensor,
    *,
    c_min: float = 0.2,
    c_max: float = 1.0,
    gamma: float = 5.0,
    alpha: float = 0.5,
    beta: float = 1.0,
) -> torch.Tensor:
    """UltraFlux's SNR-aware Huber wavelet objective (a scalar), in float32.

    ``z_t = (1 − t)·latents + t·noise``; ``ẑ = z_t − t·v_pred``; ``R = W(ẑ) − W(latents)`` with
    ``W`` the one-level orthonormal Haar DWT (:func:`haar_dwt`); per sample the mean of
    ``ρ_{c(t)}(R)`` (:func:`pseudo_huber`, :func:`huber_threshold`), times ``ω(t)``
    (:func:`loss_weight`); then the batch mean.

    Args:
        v_pred: (B, C, H, W) predicted velocity (unpacked latent layout).
        noise: (B, C, H, W) the ε that made ``z_t``.
        latents: (B, C, H, W) clean latents ``z``.
        t: (B,) one time per sample, strictly inside (0, 1).
        c_min: Huber threshold at low SNR.
        c_max: Huber threshold at SNR ≥ γ.
        gamma: SNR cap γ.
        alpha: Exponent of the threshold ramp.
        beta: Exponent of the capped SNR in the weight.
    """
    if v_pred.shape != latents.shape or noise.shape != latents.shape or latents.ndim != 4:
        raise ValueError(
            f"v_pred, noise and latents must share one (B, C, H, W) shape, got "
            f"{tuple(v_pred.shape)}, {tuple(noise.shape)}, {tuple(latents.shape)}"
        )
    if t.shape != latents.shape[:1]:
        raise ValueError(f"t must hold one time per sample, shape {tuple(latents.shape[:1])}")
    v_pred, noise, latents, t = (x.float() for x in (v_pred, noise, latents, t))
    t4 = t[:, None, None, None]
    z_t = (1 - t4) * latents + t4 * noise
    z_hat = z_t - t4 * v_pred
    residual = haar_dwt(z_hat) - haar_dwt(latents)
    c = huber_threshold(t, c_min=c_min, c_max=c_max, gamma=gamma, alpha=alpha)
    per_sample = pseudo_huber(residual, c[:, None, None, None]).mean(dim=(1, 2, 3))
    return (loss_weight(t, gamma=gamma, beta=beta) * per_sample).mean()


def flow_matching_loss(
    v_pred: torch.Tensor, noise: torch.Tensor, latents: torch.Tensor
) -> torch.Tensor:
    """Plain (unweighted) flow matching: ``mean((v_pred − (noise − latents))²)``."""
    return (v_pred.float() - (noise.float() - latents.float())).square().mean()


def flow_matching_limit(
    v_pred: torch.Tensor, noise: torch.Tensor, latents: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    """The limit of :func:`snr_huber_wavelet_loss` for ``c → ∞``, ``β = 0``.

    ``mean_b[ t_b³ / (2(1 − t_b)) · mean((v_b − (ε_b − z_b))²) ]``: plain flow matching with a
    per-sample weight ``t³ / (2(1 − t))`` (see the module docstring for the derivation).
    """
    mse = (v_pred.float() - (noise.float() - latents.float())).square().mean(dim=(1, 2, 3))
    t = t.float()
    return (t**3 / (2 * (1 - t)) * mse).mean()


# ----------------------------------------------------------------------------------------------
# VAE decoder loss

VGG16_CFG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)  # fmt: skip
# Indices (in torchvision's vgg16().features) of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
LPIPS_TAPS: tuple[int, ...] = (3, 8, 15, 22, 29)
LPIPS_CHANNELS: tuple[int, ...] = (64, 128, 256, 512, 512)
# LPIPS's input scaling layer (inputs in [-1, 1]).
_LPIPS_SHIFT = (-0.030, -0.088, -0.188)
_LPIPS_SCALE = (0.458, 0.448, 0.450)


def _load_state_dict(path: str | Path, what: str, how: str) -> dict[str, torch.Tensor]:
    """A tensor state dict from a local ``.safetensors`` or torch file (never unpickled code)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} weight file {path} not found: {how}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a weight file: pickle, zip and safetensors each say it otherwise
        words = (str(e).splitlines() or [""])[0][:200]
        raise ValueError(
            f"{what} weight file {path} does not read as weights ({type(e).__name__}: "
            f"{words}): {how}"
        ) from None
    if not isinstance(loaded, dict) or not all(
        isinstance(v, torch.Tensor) for v in loaded.values()
    ):
        raise ValueError(f"{what} weight file {path} does not hold a state dict of tensors: {how}")
    return loaded


class PerceptualLoss(nn.Module):
    """LPIPS-style distance on torchvision's VGG16 features (frozen; weights from local files).

    Args:
        vgg_weights: torchvision VGG16 weights (``vgg16-397923af.pth`` or a file with only the
            ``features.*`` keys, ``.pth`` or ``.safetensors``).
        lpips_weights: Optional LPIPS linear heads (``vgg.pth`` of the LPIPS release:
            ``lin0.model.1.weight`` … ``lin4…``, each (1, C, 1, 1)); with them and ImageNet VGG
            weights this is LPIPS-vgg. Without them every channel weighs the same.

    Raises:
        FileNotFoundError: A named file does not exist (the message says how to provide it).
    """

    def __init__(self, vgg_weights: str | Path, lpips_weights: str | Path | None = None) -> None:
        super().__init__()
        from torchvision.models.vgg import make_layers

        self.features = make_layers(list(VGG16_CFG), batch_norm=False)
        state = _load_state_dict(
            vgg_weights,
            "VGG16",
            "copy torchvision's vgg16-397923af.pth (ImageNet VGG16) to this machine and name it "
            "in the config (loss.vgg_weights)",
        )
        state = {k.removeprefix("features."): v for k, v in state.items() if "classifier" not in k}
        missing, unexpected = self.features.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{vgg_weights} is not a VGG16 state dict (missing {missing[:3]}, unexpected "
                f"{unexpected[:3]})"
            )
        lin = [torch.ones(1, c, 1, 1) for c in LPIPS_CHANNELS]
        if lpips_weights is not None:
            heads = _load_state_dict(
                lpips_weights,
                "LPIPS",
                "copy the LPIPS release's weights/v0.1/vgg.pth to this machine, or leave "
                "loss.lpips_weights empty for uniform channel weights",
            )
            try:
                lin = [heads[f"lin{i}.model.1.weight"].float() for i in range(5)]
            except KeyError as e:
                raise ValueError(f"{lpips_weights} lacks LPIPS head {e}") from e
        for i, w in enumerate(lin):
            self.register_buffer(f"lin{i}", w.reshape(1, -1, 1, 1), persistent=False)
        self.register_buffer("shift", torch.tensor(_LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> PerceptualLoss:
        """Always in eval mode (frozen)."""
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-sample distance (B,) between images ``x`` and ``y`` in [-1, 1], (B, 3, H, W)."""
        h = torch.cat([x, y]).float()
        h = (h - self.shift) / self.scale
        total = h.new_zeros(x.shape[0])
        taps = iter(LPIPS_TAPS)
        tap, i = next(taps), 0
        for j, layer in enumerate(self.features):
            h = layer(h)
            if j == tap:
                fx, fy = h.chunk(2)
                fx = fx / (fx.square().sum(1, keepdim=True).sqrt() + 1e-10)
                fy = fy / (fy.square().sum(1, keepdim=True).sqrt() + 1e-10)
                d = ((fx - fy).square() * getattr(self, f"lin{i}")).sum(1)
                total = total + d.mean(dim=(1, 2))
                i += 1
                tap = next(taps, -1)
                if tap < 0:
                    break
        return total


def wavelet_high_frequency_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of the three high-frequency Haar sub-bands (LH, HL, HH)."""
    c = x.shape[1]
    dx, dy = haar_dwt(x.float())[:, c:], haar_dwt(y.float())[:, c:]
    return (dx - dy).abs().mean()


class VaeLoss(nn.Module):
    """``λ_l2·L2 + λ_wav·wavelet(high-frequency Haar sub-bands) + λ_perc·perceptual``.

    Args:
        l2_weight: Weight of the pixel MSE (paper: 1.0).
        wavelet_weight: Weight of :func:`wavelet_high_frequency_loss` (paper: 0.2).
        perceptual_weight: Weight of the LPIPS-style term (paper: 0.1); needs ``perceptual``.
        perceptual: The :class:`PerceptualLoss` network, or None when its weight is 0.
    """

    def __init__(
        self,
        *,
        l2_weight: float = 1.0,
        wavelet_weight: float = 0.2,
        perceptual_weight: float = 0.1,
        perceptual: PerceptualLoss | None = None,
    ) -> None:
        super().__init__()
        if perceptual_weight > 0 and perceptual is None:
            raise ValueError("perceptual_weight > 0 needs a PerceptualLoss (VGG16 weights)")
        self.weights = (l2_weight, wavelet_weight, perceptual_weight)
        self.perceptual = perceptual

    def forward(
        self, recon: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Total loss and its terms, for (B, 3, H, W) images in [-1, 1]."""
        l2_w, wav_w, perc_w = self.weights
        l2 = (recon.float() - target.float()).square().mean()
        wav = wavelet_high_frequency_loss(recon, target)
        total = l2_w * l2 + wav_w * wav
        terms = {"l2": l2.item(), "wavelet": wav.item()}
        if perc_w > 0:
            perc = self.perceptual(recon, target).mean()
            total = total + perc_w * perc
            terms["perceptual"] = perc.item()
        return total, terms


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB) of images in [-1, 1] (computed on [0, 1])."""
    mse = ((x.float() - y.float()) / 2).square().mean(dim=(1, 2, 3)).clamp_min(1e-12)
    return -10 * torch.log10(mse)
