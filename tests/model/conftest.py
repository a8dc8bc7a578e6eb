"""Shared fixtures of the model tests."""

import pytest


@pytest.fixture
def tiny_dit() -> dict:
    """Config of a tiny Flux-layout DiT (one block of each kind), built in milliseconds."""
    return {
        "num_layers": 1,
        "num_single_layers": 1,
        "attention_head_dim": 16,
        "num_attention_heads": 2,
        "joint_attention_dim": 32,
        "pooled_projection_dim": 16,
        "in_channels": 16,
        "axes_dims_rope": (4, 6, 6),
        "guidance_embeds": True,
    }
