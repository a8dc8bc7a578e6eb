"""Tiny random-weight model folders for tests, the CPU demo and smoke runs.

Everything here is random: a tiny F16 VAE, a tiny UltraFlux DiT config, and tiny CLIP/T5 text
encoders with word-level tokenizers, all saved in the diffusers/transformers layouts the real
checkpoints use, so the trainers load them exactly as they would load FLUX.1-dev's parts.
Losses from these models show that the code trains; they say nothing about image quality.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

TINY_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [8, 8, 16, 16],
    "layers_per_block": 1,
    "latent_channels": 16,
    "norm_num_groups": 4,
    "sample_size": 64,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "mid_block_add_attention": False,
    "stride": 2,
}
"""An F16 VAE (3 downsamplings × stride 2 = 16×) with a few thousand parameters."""

TINY_DIT: dict[str, Any] = {
    "num_layers": 1,
    "num_single_layers": 1,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "pooled_projection_dim": 16,
    "in_channels": 64,
    "axes_dims_rope": [4, 6, 6],
    "guidance_embeds": True,
}
"""A DiT with one double- and one single-stream block, 32 wide, for 16-channel latents."""

_WORDS = tuple(
    [
        "a",
        "photo",
        "of",
        "the",
        "mountain",
        "lake",
        "sky",
        "city",
        "street",
        "night",
        "forest",
        "sea",
        "beach",
        "portrait",
        "person",
        "tree",
        "snow",
        "sunset",
        "building",
        "river",
        "road",
        "car",
        "dog",
        "cat",
        "flower",
        "field",
        "cloud",
        "light",
    ]
)


def save_tiny_vae(folder: str | Path, seed: int = 0) -> Path:
    """A random tiny F16 VAE in diffusers layout."""
    from model.vae import AutoencoderKLF16

    torch.manual_seed(seed)
    AutoencoderKLF16(**TINY_VAE).save_pretrained(folder)
    return Path(folder)


def _word_tokenizer(model_max_length: int, eos: bool) -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "</s>": 2}
    for w in _WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if eos:
        tok.post_processor = processors.TemplateProcessing(
            single="$A </s>", special_tokens=[("</s>", 2)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="</s>",
        model_max_length=model_max_length,
    )


def save_tiny_text_encoders(
    folder: str | Path, *, seq_dim: int = 32, pooled_dim: int = 16, seed: int = 0
) -> Path:
    """Random tiny CLIP and T5 encoders plus tokenizers in FLUX.1-dev's folder layout."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    root = Path(folder)
    torch.manual_seed(seed)
    vocab_size = len(_WORDS) + 8
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size, hidden_size=pooled_dim, intermediate_size=2 * pooled_dim,
            num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77,
            pad_token_id=0, bos_token_id=2, eos_token_id=2,
        )
    )  # fmt: skip
    clip.save_pretrained(root / "text_encoder")
    _word_tokenizer(77, eos=True).save_pretrained(root / "tokenizer")
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=vocab_size, d_model=seq_dim, d_kv=8, d_ff=2 * seq_dim, num_layers=1,
            num_heads=2, pad_token_id=0, eos_token_id=2,
        )
    )  # fmt: skip
    t5.save_pretrained(root / "text_encoder_2")
    _word_tokenizer(4096, eos=True).save_pretrained(root / "tokenizer_2")
    return root
