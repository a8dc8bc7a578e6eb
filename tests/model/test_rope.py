"""Tests for model/rope.py and the RoPE inside UltraFluxTransformer2DModel."""

import math

import pytest
import torch
from diffusers.models.transformers.transformer_flux import FluxPosEmbed

from model.rope import (
    ROPE_METHODS,
    ResonancePosEmbed,
    attention_scale,
    axis_frequencies,
    base_frequencies,
    cycles_per_window,
)


def flux_ids(num_text: int, rows: int, cols: int) -> torch.Tensor:
    """Text ids (zeros) followed by image ids (0, row, col), as Flux's pipeline builds them."""
    img = torch.zeros(rows, cols, 3)
    img[..., 1] = torch.arange(rows)[:, None]
    img[..., 2] = torch.arange(cols)[None, :]
    return torch.cat([torch.zeros(num_text, 3), img.reshape(-1, 3)])


@pytest.mark.parametrize("method", ROPE_METHODS)
def test_equals_diffusers_flux_rope_inside_window(method: str) -> None:
    ids = flux_ids(7, 64, 41)
    ref_cos, ref_sin = FluxPosEmbed(theta=10000, axes_dim=[16, 56, 56])(ids)
    cos, sin = ResonancePosEmbed(10000.0, (16, 56, 56), method=method)(ids)
    assert torch.equal(cos, ref_cos)
    assert torch.equal(sin, ref_sin)
    for span in (1, 17, 64):
        assert torch.equal(axis_frequencies(56, span, method=method), base_frequencies(56))


@pytest.mark.parametrize("method", ["resonance", "resonance_yarn", "yarn", "ultraflux_released"])
def test_outside_window_changes_frequencies(method: str) -> None:
    assert not torch.allclose(axis_frequencies(56, 128, method=method), base_frequencies(56))


def test_resonance_gives_integer_cycles_per_window() -> None:
    base = base_frequencies(56)
    freqs = axis_frequencies(56, 170, method="resonance")
    cycles = cycles_per_window(freqs, 64)
    assert torch.allclose(cycles, cycles.round(), atol=1e-9)
    assert (cycles >= 1).all()
    # Each band moves to its nearest integer count (>= 1), never further than half a cycle.
    base_cycles = cycles_per_window(base, 64)
    assert torch.equal(cycles.round(), base_cycles.round().clamp_min(1))
    fast = base_cycles >= 1
    assert ((cycles - base_cycles)[fast].abs() <= 0.5 + 1e-9).all()
    # Slow bands (< 0.5 cycles per window) are lifted to exactly one cycle.
    assert (base_cycles < 0.5).any()
    assert torch.allclose(cycles[base_cycles < 0.5], torch.ones(1, dtype=torch.float64))


@pytest.mark.parametrize(
    ("span", "alpha", "beta"), [(128, 1.25, 0.75), (96, 1.5, 0.5), (400, 1.25, 0.75)]
)
def test_yarn_ramp_matches_equations(span: int, alpha: float, beta: float) -> None:
    dim, theta, train_len, max_scale = 56, 10000.0, 64, 2.0
    s = min(span / train_len, max_scale)
    got = axis_frequencies(dim, span, method="yarn", alpha=alpha, beta=beta)
    got_res = axis_frequencies(dim, span, method="resonance_yarn", alpha=alpha, beta=beta)
    for k in range(dim // 2):
        omega = theta ** (-2 * k / dim)
        r = train_len * omega / (2 * math.pi)
        gamma = min(max((r - beta) / (alpha - beta), 0.0), 1.0)
        assert got[k].item() == pytest.approx((1 - gamma) * omega / s + gamma * omega, rel=1e-12)
        r_hat = max(1, round(r))
        omega_hat = 2 * math.pi * r_hat / train_len
        gamma_hat = min(max((r_hat - beta) / (alpha - beta), 0.0), 1.0)
        want = (1 - gamma_hat) * omega_hat / s + gamma_hat * omega_hat
        assert got_res[k].item() == pytest.approx(want, rel=1e-12)
    cycles = cycles_per_window(base_frequencies(dim), train_len)
    assert torch.equal(got[cycles >= alpha], base_frequencies(dim)[cycles >= alpha])
    assert torch.allclose(got[cycles <= beta], base_frequencies(dim)[cycles <= beta] / s)


def test_released_method_bands_and_scale() -> None:
    dim, span = 56, 128
    base = base_frequencies(dim)
    got = axis_frequencies(dim, span, method="ultraflux_released", max_scale=1.0)
    cycles = cycles_per_window(base, 64)
    # The fastest band (10.2 rotations per window, before the 16 -> 2 rotation ramp starts on
    # band 0) keeps its resonance-snapped frequency: exactly 10 cycles per window.
    assert cycles_per_window(got[:1], 64).item() == pytest.approx(round(cycles[0].item()))
    # Bands in the ramp are strictly between the snapped and the interpolated spectra.
    assert got[2] < 2 * math.pi * cycles[2].round() / 64
    # The slowest bands are linearly interpolated by the uncapped scale.
    assert torch.allclose(got[-3:], base[-3:] / (span / 64), rtol=1e-12)
    # Frequencies never increase from fast to slow bands.
    assert (got[1:] <= got[:-1]).all()
    assert attention_scale(span, method="ultraflux_released") == pytest.approx(
        0.1 * math.log(2) + 1
    )
    assert attention_scale(64, method="ultraflux_released") == 1.0
    assert attention_scale(span, method="resonance_yarn") == 1.0


@pytest.mark.parametrize("method", ["resonance_yarn", "ultraflux_released"])
def test_position_embedding_of_a_5440x3072_image(method: str) -> None:
    rows, cols, num_text = 3072 // 32, 5440 // 32, 512
    ids = flux_ids(num_text, rows, cols)
    embed = ResonancePosEmbed(10000.0, (16, 56, 56), method=method)
    assert embed.axis_spans(ids) == [96, 170]
    cos, sin = embed(ids)
    assert cos.shape == sin.shape == (num_text + rows * cols, 128)
    assert cos.dtype == torch.float32
    ref_cos, ref_sin = FluxPosEmbed(theta=10000, axes_dim=[16, 56, 56])(ids)
    # The text/time axis is never scaled.
    assert torch.equal(cos[:, :16], ref_cos[:, :16])
    assert torch.equal(sin[:, :16], ref_sin[:, :16])
    # Each image axis uses the frequencies of its own span: H (96 tokens) and W (170 tokens).
    img = ids[num_text:]
    for axis, span, cols_ in ((1, 96, slice(16, 72)), (2, 170, slice(72, 128))):
        freqs = axis_frequencies(56, span, method=method)
        scale = attention_scale(span, method=method)
        phase = torch.outer(img[:, axis].double(), freqs)
        want_cos = (phase.cos().repeat_interleave(2, dim=1) * scale).float()
        want_sin = (phase.sin().repeat_interleave(2, dim=1) * scale).float()
        assert torch.allclose(cos[num_text:, cols_], want_cos, atol=1e-6)
        assert torch.allclose(sin[num_text:, cols_], want_sin, atol=1e-6)
    # The two axes are extrapolated differently (different spans), and differ from Flux's.
    assert not torch.allclose(cos[num_text:, 16:72], ref_cos[num_text:, 16:72])
    assert not torch.allclose(
        axis_frequencies(56, 96, method=method), axis_frequencies(56, 170, method=method)
    )


def test_rejects_unknown_method() -> None:
    with pytest.raises(ValueError, match="unknown RoPE method"):
        axis_frequencies(56, 128, method="ntk")


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"alpha": 0.75, "beta": 1.25}, "alpha > beta"),
        ({"train_len": 0}, "train_len must be positive"),
        ({"max_scale": 0.5}, "max_scale"),
    ],
)
def test_unusable_yarn_settings_are_refused_when_built(setting: dict, message: str) -> None:
    """They were accepted (and saved with a model) and failed only at the first forward with an
    axis longer than the window, hours into a run; a cap under 1 never failed but raised the
    slow bands' frequencies (positions compressed instead of interpolated)."""
    with pytest.raises(ValueError, match=message):
        ResonancePosEmbed(10000.0, (16, 56, 56), **setting)
    with pytest.raises(ValueError, match=message):
        axis_frequencies(56, 128, method="resonance_yarn", **setting)
