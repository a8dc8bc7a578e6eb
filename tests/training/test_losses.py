"""Tests for training/losses.py: the SNR-aware Huber wavelet loss and the VAE decoder loss."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from training.losses import (
    PerceptualLoss,
    VaeLoss,
    flow_matching_limit,
    haar_dwt,
    snr_huber_wavelet_loss,
    wavelet_high_frequency_loss,
)


def transcription(v, eps, z, t, *, c_min, c_max, gamma, alpha, beta) -> float:
    """The reference formula written out literally, element by element, in float64 Python."""
    num_b, num_c, h, w = z.shape
    total = 0.0
    for b in range(num_b):
        tb = float(t[b])
        zhat = (1 - tb) * z[b] + tb * eps[b] - tb * v[b]
        snr = (1 - tb) ** 2 / tb**2
        c = c_min + (c_max - c_min) * (min(snr, gamma) / gamma) ** alpha
        omega = tb / (1 - tb) * min(snr, gamma) ** beta
        acc, count = 0.0, 0
        for ch in range(num_c):
            for i in range(0, h, 2):
                for j in range(0, w, 2):
                    pa, pb = (
                        zhat[ch, i, j] - z[b, ch, i, j],
                        zhat[ch, i, j + 1] - z[b, ch, i, j + 1],
                    )
                    pc = zhat[ch, i + 1, j] - z[b, ch, i + 1, j]
                    pd = zhat[ch, i + 1, j + 1] - z[b, ch, i + 1, j + 1]
                    # The four orthonormal Haar coefficients of the residual's 2x2 block.
                    for r in (
                        (pa + pb + pc + pd) / 2,
                        (pa - pb + pc - pd) / 2,
                        (pa + pb - pc - pd) / 2,
                        (pa - pb - pc + pd) / 2,
                    ):
                        acc += c**2 * (math.sqrt(1 + (float(r) / c) ** 2) - 1)
                        count += 1
        total += omega * acc / count
    return total / num_b


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    c_min=st.floats(0.05, 0.5),
    c_span=st.floats(0.0, 2.0),
    gamma=st.floats(0.5, 20.0),
    alpha=st.floats(0.1, 2.0),
    beta=st.floats(0.0, 2.0),
)
def test_matches_a_direct_transcription(seed, c_min, c_span, gamma, alpha, beta) -> None:
    g = torch.Generator().manual_seed(seed)
    shape = (3, 2, 4, 6)
    v, eps, z = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.rand(3, generator=g, dtype=torch.float64) * 0.98 + 0.01
    kw = {"c_min": c_min, "c_max": c_min + c_span, "gamma": gamma, "alpha": alpha, "beta": beta}
    got = snr_huber_wavelet_loss(v, eps, z, t, **kw)
    assert got.ndim == 0 and got.dtype == torch.float32
    want = transcription(v.numpy(), eps.numpy(), z.numpy(), t.numpy(), **kw)
    assert got.item() == pytest.approx(want, rel=2e-5, abs=1e-7)


def test_limit_large_c_and_beta_zero_is_reweighted_flow_matching() -> None:
    g = torch.Generator().manual_seed(0)
    v, eps, z = (torch.randn(4, 16, 8, 8, generator=g) for _ in range(3))
    t = torch.tensor([0.1, 0.4, 0.7, 0.95])
    limit = flow_matching_limit(v, eps, z, t)
    for c in (1e2, 1e4, 1e8):
        got = snr_huber_wavelet_loss(v, eps, z, t, c_min=c, c_max=c, beta=0.0)
        # rho_c(r) = r^2/2 - r^4/(8c^2) + ...: the gap shrinks as 1/c^2.
        assert got.item() == pytest.approx(limit.item(), rel=max(3.0 / c**2, 1e-6))
    # With one t for the whole batch the limit is plain flow matching times t^3 / (2(1 - t)).
    t_same = torch.full((4,), 0.3)
    plain = (v - (eps - z)).square().mean()
    got = snr_huber_wavelet_loss(v, eps, z, t_same, c_min=1e8, c_max=1e8, beta=0.0)
    assert got.item() == pytest.approx((0.3**3 / (2 * 0.7) * plain).item(), rel=1e-6)


def test_perfect_prediction_gives_zero_and_gradient_points_to_target() -> None:
    g = torch.Generator().manual_seed(1)
    eps, z = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([0.3, 0.8])
    assert snr_huber_wavelet_loss(eps - z, eps, z, t).item() < 1e-12
    v = torch.zeros_like(z, requires_grad=True)
    snr_huber_wavelet_loss(v, eps, z, t).backward()
    # Descending the gradient moves v toward the velocity eps - z.
    assert (-v.grad * (eps - z)).sum() > 0


def test_haar_is_orthonormal_and_rejects_odd_sizes() -> None:
    x = torch.randn(2, 3, 6, 10, dtype=torch.float64)
    w = haar_dwt(x)
    assert w.shape == (2, 12, 3, 5)
    assert torch.allclose(w.square().sum(), x.square().sum())
    # A constant image has only the low-pass band.
    const = haar_dwt(torch.ones(1, 1, 4, 4))
    assert torch.allclose(const[:, 0], torch.full((1, 2, 2), 2.0))
    assert const[:, 1:].abs().max() == 0
    with pytest.raises(ValueError, match="even"):
        haar_dwt(torch.zeros(1, 1, 3, 4))
    with pytest.raises(ValueError, match="one time per sample"):
        snr_huber_wavelet_loss(x, x, x, torch.tensor([0.5]))


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random VGG16 feature weights saved as torchvision names them (no real weights here)."""
    from torchvision.models.vgg import make_layers

    from training.losses import VGG16_CFG

    torch.manual_seed(0)
    features = make_layers(list(VGG16_CFG))
    path = tmp_path_factory.mktemp("vgg") / "vgg16_random.pth"
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path)
    return path


def test_perceptual_loss_from_local_file(vgg_file: Path, tmp_path: Path) -> None:
    net = PerceptualLoss(vgg_file)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    noisy = (x + 0.3 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    d_same, d_noisy = net(x, x), net(x, noisy)
    assert d_same.shape == (2,) and torch.allclose(d_same, torch.zeros(2))
    assert (d_noisy > 0).all()
    heads = {f"lin{i}.model.1.weight": torch.full((1, c, 1, 1), 2.0) for i, c in
             enumerate((64, 128, 256, 512, 512))}  # fmt: skip
    torch.save(heads, tmp_path / "lpips_vgg.pth")
    weighted = PerceptualLoss(vgg_file, tmp_path / "lpips_vgg.pth")
    assert torch.allclose(weighted(x, noisy), 2 * d_noisy, rtol=1e-5)
    with pytest.raises(FileNotFoundError, match=r"missing\.pth.*vgg16-397923af"):
        PerceptualLoss(tmp_path / "missing.pth")
    # a file that is no weight file was a KeyError (or a safetensors error) traceback
    (tmp_path / "notes.pth").write_text("not weights")
    (tmp_path / "notes.safetensors").write_text("not weights")
    torch.save({"weights": [1, 2]}, tmp_path / "listed.pth")
    for name in ("notes.pth", "notes.safetensors", "listed.pth"):
        with pytest.raises(ValueError, match=rf"VGG16 weight file .*{name} does not .*vgg16-3979"):
            PerceptualLoss(tmp_path / name)
    with pytest.raises(ValueError, match=r"notes\.pth does not read as weights"):
        PerceptualLoss(vgg_file, tmp_path / "notes.pth")


def test_vae_loss_terms(vgg_file: Path) -> None:
    g = torch.Generator().manual_seed(2)
    target = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    recon = target + 0.1 * torch.randn(target.shape, generator=g)
    loss_fn = VaeLoss(perceptual=PerceptualLoss(vgg_file))
    total, terms = loss_fn(recon, target)
    want = terms["l2"] + 0.2 * terms["wavelet"] + 0.1 * terms["perceptual"]
    assert total.item() == pytest.approx(want, rel=1e-6)
    assert terms["l2"] == pytest.approx((recon - target).square().mean().item(), rel=1e-6)
    # A low-frequency shift leaves the high-frequency term at zero.
    assert wavelet_high_frequency_loss(target + 0.5, target).item() == pytest.approx(0, abs=1e-6)
    with pytest.raises(ValueError, match="VGG16"):
        VaeLoss(perceptual_weight=0.1)
