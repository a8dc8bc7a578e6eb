"""Tests for model/vae.py: the F16 VAE and its partitioned (tiled) decode."""

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from model.vae import AutoencoderKLF16

TINY_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "block_out_channels": [16, 32, 32],
    "layers_per_block": 1,
    "latent_channels": 16,
    "norm_num_groups": 8,
    "sample_size": 64,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}


def tiny_f8(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    vae = AutoencoderKL(**TINY_VAE).eval()
    # Random init leaves GroupNorm at identity; perturb it so the test sees real statistics.
    with torch.no_grad():
        for module in vae.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.add_(0.3 * torch.randn_like(module.weight))
                module.bias.add_(0.3 * torch.randn_like(module.bias))
    return vae


@torch.no_grad()
def test_f8_to_f16_conversion_keeps_weights_and_changes_strides() -> None:
    f8 = tiny_f8()
    f16 = AutoencoderKLF16.from_f8(f8).eval()
    assert f16.spatial_scale_factor == 8
    for (name, a), (_, b) in zip(f8.state_dict().items(), f16.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    image = torch.randn(1, 3, 64, 96)
    # The stride-2 conv_in samples the F8 conv_in output at even positions.
    assert torch.allclose(
        f16.encoder.conv_in(image), f8.encoder.conv_in(image)[..., ::2, ::2], atol=1e-6
    )
    latent = f16.encode(image).latent_dist.mode()
    assert latent.shape == (1, 16, 8, 12)
    assert f8.encode(image).latent_dist.mode().shape == (1, 16, 16, 24)
    # The decoder is F8's up to conv_out, whose input is upsampled ×2 (nearest).
    captured = {}
    f8.decoder.conv_out.register_forward_hook(lambda m, inp, out: captured.update(x=inp[0]))
    f8.decode(latent)
    want = f8.decoder.conv_out(F.interpolate(captured["x"], scale_factor=2, mode="nearest"))
    got = f16.decode(latent).sample
    assert got.shape == (1, 3, 64, 96)
    assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("latent_hw", [(6, 10), (11, 5)])
@torch.no_grad()
def test_tiled_decode_agrees_with_untiled(latent_hw: tuple[int, int]) -> None:
    vae = AutoencoderKLF16.from_f8(tiny_f8(1)).eval()
    z = torch.randn(2, 16, *latent_hw, generator=torch.Generator().manual_seed(3))
    full = vae.decode(z).sample
    vae.enable_tiling()
    vae.set_partition_elements(16 * 32 * 3)  # stripes of a few rows: many seams to get wrong
    calls = []
    vae.decoder.up_blocks[0].register_forward_hook(lambda *_: calls.append(1))
    tiled = vae.decode(z).sample
    assert not calls, "the tiled decode must not run whole up blocks"
    assert tiled.shape == full.shape == (2, 3, latent_hw[0] * 8, latent_hw[1] * 8)
    assert torch.allclose(tiled, full, atol=2e-5, rtol=1e-4), (tiled - full).abs().max()


def test_save_load_and_released_layout(tmp_path: Path) -> None:
    vae = AutoencoderKLF16(**TINY_VAE)
    vae.save_pretrained(tmp_path / "f16")
    loaded = AutoencoderKLF16.from_pretrained(tmp_path / "f16")
    assert loaded.config.stride == 2
    assert loaded.decoder.conv_out.factor == 2
    # UltraFlux ships its F16 VAE as an AutoencoderKL config with ``stride: 2``.
    plain = AutoencoderKL(**TINY_VAE)
    plain.register_to_config(stride=2)
    plain.save_pretrained(tmp_path / "released")
    released = AutoencoderKLF16.from_pretrained(tmp_path / "released")
    assert released.encoder.conv_in.stride == (2, 2)


def test_missing_weights_give_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        AutoencoderKLF16.from_f8(tmp_path)
    AutoencoderKL(**TINY_VAE).save_pretrained(tmp_path)
    for weights in tmp_path.glob("diffusion_pytorch_model*"):
        weights.unlink()
    with pytest.raises(FileNotFoundError, match=r"diffusion_pytorch_model\.safetensors"):
        AutoencoderKLF16.from_f8(tmp_path)


def test_a_sharded_checkpoint_missing_a_shard_names_it(tmp_path: Path) -> None:
    """A shard left behind by an interrupted copy failed deep inside diffusers' loader; the
    folder is checked against its index first, and a complete sharded folder still loads."""
    AutoencoderKL(**TINY_VAE).save_pretrained(tmp_path, max_shard_size="20KB")
    shards = sorted(tmp_path.glob("diffusion_pytorch_model-*.safetensors"))
    assert len(shards) >= 2
    assert isinstance(AutoencoderKLF16.from_f8(tmp_path), AutoencoderKLF16)
    shards[-1].unlink()
    with pytest.raises(FileNotFoundError, match=rf"names {re.escape(shards[-1].name)}, not there"):
        AutoencoderKLF16.from_f8(tmp_path)
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text("{")
    with pytest.raises(ValueError, match=r"index\.json is no weight index"):
        AutoencoderKLF16.from_f8(tmp_path)
