"""FP8 (e4m3) linear layers for inference on Hopper GPUs.

Weights are quantized once per output channel; activations are quantized per row at run time
(dynamic scaling), and the product runs on the FP8 tensor cores through ``torch._scaled_mm``
with bf16 output. Where that kernel is unavailable (CPU), the same quantized numbers are
multiplied in float32, so results and tests match the GPU path up to accumulation order.

Only the large matrix products inside the transformer blocks are converted (attention
projections and MLPs); embedders, AdaLN modulation and the output projection stay in bf16.
"""

from __future__ import annotations

import torch
from torch import nn

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max

# Linear layers of diffusers' Flux blocks that carry nearly all FLOPs.
DEFAULT_FP8_LAYER_NAMES = (
    "attn.to_qkv",
    "attn.to_added_qkv",
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
    "proj_mlp",
    "proj_out",
)


def quantize_rowwise(x_MK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize each row of ``x`` to e4m3 with its own scale.

    Returns:
        ``(x_fp8 (M, K), scale (M, 1) float32)`` with ``x ≈ x_fp8 * scale``.
    """
    amax_M1 = x_MK.abs().amax(dim=-1, keepdim=True).float().clamp_min(1e-12)
    scale_M1 = amax_M1 / FP8_MAX
    x_fp8 = (x_MK.float() / scale_M1).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return x_fp8, scale_M1


class Fp8Linear(nn.Module):
    """Inference-only replacement for an ``nn.Linear`` with e4m3 weights and activations.

    Args:
        linear: The layer to convert; its weight is quantized per output channel.
        out_dtype: Dtype of the output (bf16 for the Flux transformer).
    """

    def __init__(self, linear: nn.Linear, out_dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight_fp8, weight_scale = quantize_rowwise(linear.weight.detach())
        self.register_buffer("weight_fp8", weight_fp8)
        self.register_buffer("weight_scale", weight_scale.reshape(1, -1).contiguous())
        bias = linear.bias.detach().to(out_dtype) if linear.bias is not None else None
        self.register_buffer("bias", bias)
        self.out_dtype = out_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (..., K) -> (..., N) in ``out_dtype``."""
        lead_shape = x.shape[:-1]
        x_fp8, x_scale = quantize_rowwise(x.reshape(-1, self.in_features))
        if x.is_cuda:
            y = torch._scaled_mm(
                x_fp8,
                self.weight_fp8.t(),
                scale_a=x_scale,
                scale_b=self.weight_scale,
                out_dtype=self.out_dtype,
            )
            if self.bias is not None:
                y = y + self.bias
        else:
            y = (x_fp8.float() * x_scale) @ (self.weight_fp8.float() * self.weight_scale.t()).t()
            if self.bias is not None:
                y = y + self.bias.float()
            y = y.to(self.out_dtype)
        return y.reshape(*lead_shape, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, e4m3"


def convert_linears_to_fp8(
    model: nn.Module,
    layer_names: tuple[str, ...] = DEFAULT_FP8_LAYER_NAMES,
    out_dtype: torch.dtype = torch.bfloat16,
) -> int:
    """Replace, in place, every ``nn.Linear`` inside the transformer blocks whose qualified name
    ends with one of ``layer_names`` by an :class:`Fp8Linear`.

    Returns:
        The number of layers converted.
    """
    targets = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and "transformer_blocks." in name
        and name.endswith(layer_names)
        and module.in_features % 16 == 0
        and module.out_features % 16 == 0
    ]
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, Fp8Linear(getattr(parent, child), out_dtype=out_dtype))
    return len(targets)
