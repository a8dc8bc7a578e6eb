"""Resonance 2D RoPE with YaRN for native-4K Flux transformers.

Flux encodes a token at position ``p`` (in tokens) on one axis with the phases ``p * omega_k``,
``omega_k = theta ** (-2k / dim)``. UltraFlux keeps that embedding inside the training window of
``train_len`` tokens per axis (64 tokens = 2048 px) and, for an axis that spans more tokens,
(1) snaps each band to an integer number of cycles per window ("resonance") and (2) interpolates
the slow bands by the axis scale ``s = span / train_len`` ("YaRN"). Each image axis is treated on
its own; the text axis is never scaled.

The methods, all equal to ``"base"`` when ``span <= train_len``:

- ``"base"``: Flux's frequencies.
- ``"resonance"``: ``r_k = train_len * omega_k / 2pi``; ``r^_k = max(1, round(r_k))``;
  ``omega^_k = 2pi * r^_k / train_len``.
- ``"yarn"``: ``gamma(r) = clamp((r - beta) / (alpha - beta), 0, 1)`` and
  ``omega = (1 - gamma) * omega / s + gamma * omega`` with ``s = min(span / train_len, max_scale)``.
- ``"resonance_yarn"``: the YaRN ramp applied to the resonance frequencies (the paper's method).
  With Flux's image axes (56 dims, theta 10,000, a 64-token window) 22 of the 28 bands make
  under 1.5 cycles per window, so ``"resonance"`` snaps or lifts them all to one cycle and
  ``"resonance_yarn"`` gives them all one frequency (0.75 * 2pi / 64 at s = 2, a period of ~85
  tokens): 7 distinct frequencies per axis instead of 28, and the slowest 530 times faster than
  Flux's. The released code (below) leaves the bands under one cycle alone.
- ``"ultraflux_released"``: what the authors' released inference code computes, so released
  weights run as trained: resonance only for bands with at least one cycle per window, then
  NTK-by-parts (linear interpolation for bands under 0.75 rotations per window, NTK-aware base
  ``theta * s ** (dim / (dim - 2))`` for bands over 1.25, a linear ramp over band indices between),
  then a return to the unscaled (resonance) frequency over 16 -> 2 rotations, with
  ``s = span / train_len`` uncapped, and cos/sin multiplied by ``0.1 * ln(s) + 1``
  (see :func:`attention_scale`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from model import ROPE_METHODS

# Rotation counts that bound the released code's NTK-by-parts ramps.
_RELEASED_NTK_FAST, _RELEASED_NTK_SLOW = 1.25, 0.75
_RELEASED_BASE_FAST, _RELEASED_BASE_SLOW = 16.0, 2.0


def base_frequencies(dim: int, *, theta: float = 10000.0) -> torch.Tensor:
    """Flux's ``dim // 2`` angular frequencies (float64), computed exactly as diffusers does."""
    if dim <= 0 or dim % 2:
        raise ValueError(f"RoPE axis dim must be a positive even number, got {dim}")
    exponents = torch.arange(0, dim, 2, dtype=torch.float64) / dim
    return 1.0 / (theta**exponents)


def cycles_per_window(freqs: torch.Tensor, train_len: int) -> torch.Tensor:
    """Number of full rotations each band completes over ``train_len`` tokens."""
    return freqs * train_len / (2 * math.pi)


def _check_yarn_settings(
    train_len: Sequence[int], alpha: float, beta: float, max_scale: float
) -> None:
    """Raise ValueError for settings no axis can use (checked before any long axis needs them)."""
    if any(n <= 0 for n in train_len):
        raise ValueError(f"train_len must be positive, got {list(train_len)}")
    if not alpha > beta:
        raise ValueError(f"YaRN needs alpha > beta, got alpha={alpha}, beta={beta}")
    if not max_scale >= 1:
        raise ValueError(
            f"max_scale caps the YaRN scale span / train_len (> 1) and must be >= 1, got "
            f"{max_scale}: below 1 it would raise the slow bands' frequencies"
        )


def _yarn_ramp(cycles: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """gamma(r): 1 for bands with >= alpha cycles per window (kept), 0 under beta (interpolated)."""
    return ((cycles - beta) / (alpha - beta)).clamp(0.0, 1.0)


def _band_index_for_rotations(
    num_rotations: float, dim: int, theta: float, train_len: int
) -> float:
    """The (fractional) band index whose base frequency makes ``num_rotations`` per window."""
    return dim * math.log(train_len / (num_rotations * 2 * math.pi)) / (2 * math.log(theta))


def _released_ramp(
    fast: float, slow: float, dim: int, theta: float, train_len: int
) -> torch.Tensor:
    """Weight per band index: 0 for bands faster than ``fast`` rotations, 1 slower than ``slow``.

    The released code places the ramp between the floor/ceil of the band indices of the two
    rotation counts, clamped to ``[0, dim // 2]``, and evaluates it on integer band indices.
    """
    lo = max(math.floor(_band_index_for_rotations(fast, dim, theta, train_len)), 0)
    hi = min(math.ceil(_band_index_for_rotations(slow, dim, theta, train_len)), dim - 1, dim // 2)
    if hi == lo:
        hi += 0.001
    k = torch.arange(dim // 2, dtype=torch.float32)
    return ((k - lo) / (hi - lo)).clamp(0.0, 1.0).to(torch.float64)


def axis_frequencies(
    dim: int,
    span: int,
    *,
    theta: float = 10000.0,
    train_len: int = 64,
    method: str = "resonance_yarn",
    alpha: float = 1.25,
    beta: float = 0.75,
    max_scale: float = 2.0,
) -> torch.Tensor:
    """Angular frequencies (radians per token) for one image axis spanning ``span`` tokens.

    Args:
        dim: Rotary dims of this axis (two per band).
        span: Number of tokens the axis covers (``max - min + 1`` of its positions).
        theta: RoPE base.
        train_len: Training window in tokens for this axis.
        method: One of :data:`ROPE_METHODS` (see the module docstring).
        alpha: Cycles per window at and above which a band keeps its frequency (YaRN).
        beta: Cycles per window at and below which a band is fully interpolated (YaRN).
        max_scale: Cap on the YaRN scale ``span / train_len`` (the paper caps it at 2);
            ``"ultraflux_released"`` ignores it, as the released code does.

    Returns:
        A float64 tensor of shape ``(dim // 2,)``.
    """
    if method not in ROPE_METHODS:
        raise ValueError(f"unknown RoPE method {method!r}; choose one of {ROPE_METHODS}")
    _check_yarn_settings([train_len], alpha, beta, max_scale)
    freqs = base_frequencies(dim, theta=theta)
    if method == "base" or span <= train_len:
        return freqs
    if method == "ultraflux_released":
        return _released_frequencies(freqs, dim, span, theta=theta, train_len=train_len)

    if method in ("resonance", "resonance_yarn"):
        cycles = cycles_per_window(freqs, train_len).round().clamp_min(1.0)
        freqs = 2 * math.pi * cycles / train_len
        if method == "resonance":
            return freqs
    else:
        cycles = cycles_per_window(freqs, train_len)
    scale = min(span / train_len, max_scale)
    gamma = _yarn_ramp(cycles, alpha, beta)
    return (1.0 - gamma) * freqs / scale + gamma * freqs


def _released_frequencies(
    freqs: torch.Tensor, dim: int, span: int, *, theta: float, train_len: int
) -> torch.Tensor:
    """The released UltraFlux inference frequencies for an axis longer than its window."""
    scale = span / train_len
    cycles = cycles_per_window(freqs, train_len)
    snapped = 2 * math.pi * cycles.round() / train_len
    base = torch.where(cycles >= 1.0, snapped, freqs)
    # The NTK-aware spectrum raises the larger base to the same (resonance-adjusted) exponent.
    exponent = -torch.log(base) / math.log(theta)
    ntk_theta = theta * scale ** (dim / (dim - 2))
    ntk = ntk_theta ** (-exponent)
    linear = base / scale
    to_linear = _released_ramp(_RELEASED_NTK_FAST, _RELEASED_NTK_SLOW, dim, theta, train_len)
    mixed = ntk * (1.0 - to_linear) + linear * to_linear
    to_mixed = _released_ramp(_RELEASED_BASE_FAST, _RELEASED_BASE_SLOW, dim, theta, train_len)
    return base * (1.0 - to_mixed) + mixed * to_mixed


def attention_scale(span: int, *, train_len: int = 64, method: str = "resonance_yarn") -> float:
    """Factor on cos/sin of one image axis: ``0.1 ln s + 1`` for the released method, else 1."""
    if method == "ultraflux_released" and span > train_len:
        return 0.1 * math.log(span / train_len) + 1.0
    return 1.0


def rotary_cos_sin(
    pos: torch.Tensor, freqs: torch.Tensor, *, scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of ``pos * freqs``, each band repeated twice, as diffusers' Flux RoPE lays out.

    Args:
        pos: ``(S,)`` positions (any float dtype).
        freqs: ``(D/2,)`` float64 frequencies.
        scale: Factor applied to both cos and sin.

    Returns:
        Two float32 tensors of shape ``(S, D)``.
    """
    phase_SK = torch.outer(pos, freqs.to(pos.device))
    cos_SD = phase_SK.cos().repeat_interleave(2, dim=1).float()
    sin_SD = phase_SK.sin().repeat_interleave(2, dim=1).float()
    if scale != 1.0:
        cos_SD, sin_SD = cos_SD * scale, sin_SD * scale
    return cos_SD, sin_SD


class ResonancePosEmbed(nn.Module):
    """Drop-in replacement for diffusers' ``FluxPosEmbed`` with per-axis Resonance RoPE + YaRN.

    Ids are ``(S, num_axes)``, as Flux builds them: axis 0 is the text/time axis (never scaled),
    the others are image axes (H then W). Each image axis gets :func:`axis_frequencies` for its
    own span, so a 5440x3072 image (170 x 96 tokens) extrapolates W more than H.

    Args:
        theta: RoPE base.
        axes_dim: Rotary dims per axis, e.g. ``(16, 56, 56)``.
        method: One of :data:`ROPE_METHODS`.
        train_len: Training window in tokens, one value for all image axes or one per axis.
        alpha: YaRN upper cycles-per-window bound.
        beta: YaRN lower cycles-per-window bound.
        max_scale: Cap on the YaRN scale (not used by ``"ultraflux_released"``).
    """

    def __init__(
        self,
        theta: float,
        axes_dim: Sequence[int],
        *,
        method: str = "resonance_yarn",
        train_len: int | Sequence[int] = 64,
        alpha: float = 1.25,
        beta: float = 0.75,
        max_scale: float = 2.0,
    ) -> None:
        super().__init__()
        if method not in ROPE_METHODS:
            raise ValueError(f"unknown RoPE method {method!r}; choose one of {ROPE_METHODS}")
        self.theta = theta
        self.axes_dim = list(axes_dim)
        self.method = method
        num_image_axes = len(self.axes_dim) - 1
        if isinstance(train_len, int):
            self.train_len = [train_len] * num_image_axes
        else:
            self.train_len = list(train_len)
        if len(self.train_len) != num_image_axes:
            raise ValueError(f"need one train_len per image axis ({num_image_axes})")
        _check_yarn_settings(self.train_len, alpha, beta, max_scale)
        self.alpha, self.beta, self.max_scale = alpha, beta, max_scale

    def axis_spans(self, ids: torch.Tensor) -> list[int]:
        """Tokens covered by each image axis of ``ids`` (``max - min + 1``)."""
        lo = ids[:, 1:].amin(dim=0).tolist()
        hi = ids[:, 1:].amax(dim=0).tolist()
        return [int(h - lo_) + 1 for lo_, h in zip(lo, hi, strict=True)]

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(cos, sin)``, each ``(S, sum(axes_dim))`` float32, for ``ids`` ``(S, A)``."""
        if ids.shape[-1] != len(self.axes_dim):
            raise ValueError(f"ids have {ids.shape[-1]} axes, expected {len(self.axes_dim)}")
        pos = ids.float()
        spans = self.axis_spans(ids) if self.method != "base" else [0] * (len(self.axes_dim) - 1)
        cos_parts, sin_parts = [], []
        for axis, dim in enumerate(self.axes_dim):
            if axis == 0:
                freqs, scale = base_frequencies(dim, theta=self.theta), 1.0
            else:
                span, train_len = spans[axis - 1], self.train_len[axis - 1]
                freqs = axis_frequencies(
                    dim,
                    span,
                    theta=self.theta,
                    train_len=train_len,
                    method=self.method,
                    alpha=self.alpha,
                    beta=self.beta,
                    max_scale=self.max_scale,
                )
                scale = attention_scale(span, train_len=train_len, method=self.method)
            cos, sin = rotary_cos_sin(pos[:, axis], freqs.to(_freqs_dtype(ids.device)), scale=scale)
            cos_parts.append(cos)
            sin_parts.append(sin)
        return torch.cat(cos_parts, dim=-1), torch.cat(sin_parts, dim=-1)


def _freqs_dtype(device: torch.device) -> torch.dtype:
    """float64 where the device supports it (as diffusers' Flux RoPE), else float32."""
    return torch.float32 if device.type in ("mps", "npu") else torch.float64
