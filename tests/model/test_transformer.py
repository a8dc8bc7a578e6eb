"""Tests for model/transformer.py: a tiny UltraFlux DiT against diffusers' Flux DiT."""

from pathlib import Path

import pytest
import torch
from diffusers import FluxTransformer2DModel

from model.transformer import UltraFluxTransformer2DModel


def inputs(rows: int, cols: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    img_ids = torch.zeros(rows, cols, 3)
    img_ids[..., 1] = torch.arange(rows)[:, None]
    img_ids[..., 2] = torch.arange(cols)[None, :]
    return {
        "hidden_states": torch.randn(1, rows * cols, 16, generator=g),
        "encoder_hidden_states": torch.randn(1, 5, 32, generator=g),
        "pooled_projections": torch.randn(1, 16, generator=g),
        "timestep": torch.tensor([0.7]),
        "guidance": torch.tensor([4.0]),
        "img_ids": img_ids.reshape(-1, 3),
        "txt_ids": torch.zeros(5, 3),
    }


def paired_models(
    config: dict, rope_method: str
) -> tuple[FluxTransformer2DModel, UltraFluxTransformer2DModel]:
    torch.manual_seed(0)
    flux = FluxTransformer2DModel(**config).eval()
    ultra = UltraFluxTransformer2DModel(**config, rope_method=rope_method).eval()
    ultra.load_state_dict(flux.state_dict(), strict=True)
    return flux, ultra


@torch.no_grad()
def test_same_as_flux_inside_window_and_not_outside(tiny_dit: dict) -> None:
    flux, ultra = paired_models(tiny_dit, "resonance_yarn")
    x = inputs(8, 12)
    assert torch.equal(flux(**x).sample, ultra(**x).sample)
    x = inputs(4, 80)  # W spans 80 tokens > 64: extrapolated.
    assert not torch.allclose(flux(**x).sample, ultra(**x).sample, atol=1e-4)
    ultra.set_rope_method("base")
    assert torch.equal(flux(**x).sample, ultra(**x).sample)


def test_rope_settings_saved_with_the_model(tmp_path: Path, tiny_dit: dict) -> None:
    model = UltraFluxTransformer2DModel(**tiny_dit, rope_method="resonance", rope_train_len=32)
    model.save_pretrained(tmp_path)
    loaded = UltraFluxTransformer2DModel.from_pretrained(tmp_path)
    assert loaded.config.rope_method == "resonance"
    assert loaded.pos_embed.method == "resonance"
    assert loaded.pos_embed.train_len == [32, 32]


def test_loads_flux_and_released_folders(tmp_path: Path, tiny_dit: dict) -> None:
    flux, _ = paired_models(tiny_dit, "base")
    flux.save_pretrained(tmp_path)
    loaded = UltraFluxTransformer2DModel.from_pretrained(tmp_path)
    for (name, a), (_, b) in zip(
        flux.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    # The released UltraFlux config names its RoPE scheme ``method: "yarn"``.
    released = UltraFluxTransformer2DModel.from_pretrained(tmp_path, method="yarn")
    assert released.config.rope_method == "ultraflux_released"
    assert released.pos_embed.method == "ultraflux_released"
    with pytest.raises(ValueError, match="rope_method"):
        UltraFluxTransformer2DModel(**tiny_dit, rope_method="ntk")
