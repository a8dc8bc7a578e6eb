"""Tests for model/fp8.py: e4m3 linear layers against their bf16/fp32 originals."""

import pytest
import torch

from model.fp8 import FP8_DTYPE, Fp8Linear, convert_linears_to_fp8, quantize_rowwise
from model.transformer import UltraFluxTransformer2DModel


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_rowwise_quantization_round_trip() -> None:
    x = torch.randn(64, 256) * torch.logspace(-3, 3, 64)[:, None]  # rows of very different size
    x_fp8, scale = quantize_rowwise(x)
    assert x_fp8.dtype == FP8_DTYPE and scale.shape == (64, 1)
    back = x_fp8.float() * scale
    # e4m3 keeps 3 mantissa bits: error <= 2^-4 relative, or half the subnormal step 2^-9 x scale.
    assert ((back - x).abs() <= x.abs() * 2**-4 + scale * 2**-10 * 1.001).all()
    assert (x_fp8.float().abs().amax(dim=1) == 448).all()  # each row uses the full range
    assert max(rel_err(back[i], x[i]) for i in range(64)) < 0.04


def test_fp8_linear_matches_linear_within_tolerance() -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 128)
    x = torch.randn(3, 40, 256)
    fp8 = Fp8Linear(linear, out_dtype=torch.float32)
    got = fp8(x)
    assert got.shape == (3, 40, 128)
    assert rel_err(got, linear(x)) < 0.05
    assert not torch.equal(got, linear(x))  # it really is quantized


@torch.no_grad()
def test_convert_transformer_blocks_only(tiny_dit: dict) -> None:
    torch.manual_seed(0)
    model = UltraFluxTransformer2DModel(**tiny_dit).eval()
    img_ids = torch.stack(torch.meshgrid(torch.arange(6), torch.arange(6), indexing="ij"), -1)
    inputs = {
        "hidden_states": torch.randn(1, 36, 16),
        "encoder_hidden_states": torch.randn(1, 4, 32),
        "pooled_projections": torch.randn(1, 16),
        "timestep": torch.tensor([0.5]),
        "guidance": torch.tensor([4.0]),
        "img_ids": torch.cat([torch.zeros(36, 1), img_ids.reshape(-1, 2)], dim=1),
        "txt_ids": torch.zeros(4, 3),
    }
    ref = model(**inputs).sample
    num = convert_linears_to_fp8(model, out_dtype=torch.float32)
    # Double block: q k v out, added q k v out, two MLPs x 2 layers = 12; single: q k v mlp out = 5.
    assert num == 17
    assert isinstance(model.proj_out, torch.nn.Linear)  # the final projection stays
    assert isinstance(model.single_transformer_blocks[0].proj_out, Fp8Linear)
    assert isinstance(model.transformer_blocks[0].norm1.linear, torch.nn.Linear)
    assert rel_err(model(**inputs).sample, ref) < 0.05


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_scaled_mm_path_matches_emulation_on_gpu() -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(3072, 1024).cuda().to(torch.bfloat16)
    x = torch.randn(512, 3072, device="cuda", dtype=torch.bfloat16)
    fp8 = Fp8Linear(linear)
    gpu = fp8(x)
    emulated = fp8.cpu()(x.cpu())
    assert rel_err(gpu.cpu(), emulated) < 1e-2
    assert rel_err(gpu, linear(x)) < 0.05
