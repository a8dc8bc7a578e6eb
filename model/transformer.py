"""UltraFlux DiT: diffusers' Flux transformer with Resonance 2D RoPE + YaRN.

The weights and their names are Flux's, so a Flux or UltraFlux transformer folder in diffusers
layout loads as it is; only the position embedding differs, and its settings are config keys
saved with the model.
"""

from __future__ import annotations

from typing import Any

from diffusers import FluxTransformer2DModel
from diffusers.configuration_utils import register_to_config

from model.rope import ROPE_METHODS, ResonancePosEmbed

# The released UltraFlux transformer config names its position method ``method``; ``"yarn"`` there
# is the released Resonance + NTK-by-parts scheme.
_RELEASED_METHOD_NAMES = {"yarn": "ultraflux_released", "base": "base"}

FLUX_DEV_CONFIG: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}


class UltraFluxTransformer2DModel(FluxTransformer2DModel):
    """Flux DiT (double- and single-stream blocks) whose RoPE extrapolates per image axis.

    Args:
        patch_size: See ``FluxTransformer2DModel``.
        in_channels: Packed latent channels (16 VAE channels x 2 x 2 patch = 64).
        out_channels: Output channels (default: ``in_channels``).
        num_layers: Double-stream blocks.
        num_single_layers: Single-stream blocks.
        attention_head_dim: Width of one head.
        num_attention_heads: Heads.
        joint_attention_dim: Text (T5) embedding width.
        pooled_projection_dim: Pooled (CLIP) embedding width.
        guidance_embeds: Whether the model takes an embedded guidance scale.
        axes_dims_rope: Rotary dims for the (text, H, W) axes.
        rope_theta: RoPE base.
        rope_method: One of :data:`model.rope.ROPE_METHODS`.
        rope_train_len: Training window per image axis in tokens (64 tokens = 2048 px).
        rope_alpha: YaRN upper cycles-per-window bound.
        rope_beta: YaRN lower cycles-per-window bound.
        rope_max_scale: Cap on the YaRN scale.
        method: Legacy key of released UltraFlux configs; ``"yarn"`` selects
            ``rope_method="ultraflux_released"``. Not stored.
    """

    @register_to_config
    def __init__(
        self,
        patch_size: int = 1,
        in_channels: int = 64,
        out_channels: int | None = None,
        num_layers: int = 19,
        num_single_layers: int = 38,
        attention_head_dim: int = 128,
        num_attention_heads: int = 24,
        joint_attention_dim: int = 4096,
        pooled_projection_dim: int = 768,
        guidance_embeds: bool = False,
        axes_dims_rope: tuple[int, int, int] = (16, 56, 56),
        rope_theta: float = 10000.0,
        rope_method: str = "resonance_yarn",
        rope_train_len: int = 64,
        rope_alpha: float = 1.25,
        rope_beta: float = 0.75,
        rope_max_scale: float = 2.0,
        method: str | None = None,
    ) -> None:
        if method is not None:
            if method not in _RELEASED_METHOD_NAMES:
                raise ValueError(f"unknown legacy RoPE method {method!r}")
            rope_method = _RELEASED_METHOD_NAMES[method]
        if rope_method not in ROPE_METHODS:
            raise ValueError(f"unknown rope_method {rope_method!r}; choose one of {ROPE_METHODS}")
        super().__init__(
            patch_size=patch_size,
            in_channels=in_channels,
            out_channels=out_channels,
            num_layers=num_layers,
            num_single_layers=num_single_layers,
            attention_head_dim=attention_head_dim,
            num_attention_heads=num_attention_heads,
            joint_attention_dim=joint_attention_dim,
            pooled_projection_dim=pooled_projection_dim,
            guidance_embeds=guidance_embeds,
            axes_dims_rope=axes_dims_rope,
        )
        self.pos_embed = ResonancePosEmbed(
            theta=rope_theta,
            axes_dim=axes_dims_rope,
            method=rope_method,
            train_len=rope_train_len,
            alpha=rope_alpha,
            beta=rope_beta,
            max_scale=rope_max_scale,
        )
        if method is not None:
            self.register_to_config(rope_method=rope_method, method=None)

    def set_rope_method(self, rope_method: str) -> None:
        """Switch the position method in place (and in the saved config)."""
        if rope_method not in ROPE_METHODS:
            raise ValueError(f"unknown rope_method {rope_method!r}; choose one of {ROPE_METHODS}")
        self.pos_embed.method = rope_method
        self.register_to_config(rope_method=rope_method)
