"""Random-weight models built from configs, saved where the job loads real ones from.

For tests (tiny sizes, seconds on a CPU) and GPU benchmarks (real architectures: ViT-L/14, a
~2B LLaVA-style captioner). Their scores and captions mean nothing: they exercise loading,
batching and writing, and measure speed. No network is used: tokenizers are trained here on a
few sentences with the `tokenizers` library.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
"""A tiny open_clip architecture (SimpleTokenizer's vocabulary, so its text tower works)."""

_CORPUS = [
    "a photo of a mountain lake at dusk with a boat",
    "a city street at night, people walking under the rain",
    "describe this image in one sentence",
    "USER: ASSISTANT: the image shows a forest",
    "一张山湖的照片 黄昏 船 城市 街道 夜晚 森林",
]


def build_open_clip(folder: str | Path, name: str = "tiny-clip", cfg: dict | None = None) -> dict:
    """Write `<name>.json` (an open_clip model config) and `<name>.pt` (random weights).

    Returns `{"config": path, "weights": path, "dim": embed_dim}`. The config is also
    registered in this process (`open_clip.add_model_config`).
    """
    import open_clip
    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / f"{name}.json"
    config.write_text(json.dumps(cfg or TINY_CLIP))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    model = open_clip.create_model(name, pretrained=None)
    weights = folder / f"{name}.pt"
    torch.save(model.state_dict(), weights)
    return {"config": str(config), "weights": str(weights), "dim": (cfg or TINY_CLIP)["embed_dim"]}


def build_aesthetic(path: str | Path, dim: int, seed: int = 0) -> str:
    """A random LAION-layout aesthetic MLP for `dim`-wide embeddings, saved to `path`."""
    import torch

    from curation.score.heads import AestheticMLP

    torch.manual_seed(seed)
    torch.save(AestheticMLP(dim).state_dict(), path)
    return str(path)


def build_safety(path: str | Path, widths: list[int], seed: int = 0) -> str:
    """A random safety head (`nn.Sequential` of Linear/ReLU) saved as a state dict."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        if i:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(widths[i], widths[i + 1]))
    torch.save(nn.Sequential(*layers).state_dict(), path)
    return str(path)


def _tokenizer(vocab_size: int = 400, extra: list[str] | None = None) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<pad>", "<s>", "</s>", *(extra or [])]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    kwargs: dict[str, Any] = {}
    if extra:
        kwargs["extra_special_tokens"] = {"image_token": extra[0]}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        **kwargs,
    )


CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'].upper() }}: {% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}\n"
    "{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

VLM_SIZES = {
    "tiny": {
        "vision": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 56,
            "patch_size": 14,
        },
        "text": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "max_position_embeddings": 512,
        },
        "vocab_size": None,
    },
    # CLIP ViT-L/14 at 336 px (304M) + a Qwen2-1.5B-shaped decoder (1.54B with its 151,936
    # vocabulary): about 1.9B parameters, the size class of Qwen2-VL-2B.
    "2b": {
        "vision": {
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "image_size": 336,
            "patch_size": 14,
        },
        "text": {
            "hidden_size": 1536,
            "intermediate_size": 8960,
            "num_hidden_layers": 28,
            "num_attention_heads": 12,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
        },
        "vocab_size": 151_936,
    },
}


def build_vlm(
    folder: str | Path, size: str = "tiny", dtype: str = "float32", device: str = "cpu"
) -> str:
    """A random LLaVA-style image-text-to-text model with its processor, saved to `folder`.

    `device` 'cuda' initialises the weights there (seconds instead of minutes at 2B).
    """
    import torch
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    spec = VLM_SIZES[size]
    tok = _tokenizer(extra=["<image>"])
    vocab = spec["vocab_size"] or len(tok)
    vision = CLIPVisionConfig(**spec["vision"])
    text = LlamaConfig(
        vocab_size=vocab,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        **spec["text"],
    )
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaForConditionalGeneration(cfg).to(getattr(torch, dtype))
    side = spec["vision"]["image_size"]
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": side}, crop_size={"height": side, "width": side}
        ),
        tokenizer=tok,
        patch_size=spec["vision"]["patch_size"],
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        num_additional_image_tokens=1,
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)


def build_translator(folder: str | Path) -> str:
    """A tiny random BART sequence-to-sequence model with a tokenizer, saved to `folder`."""
    import torch
    from transformers import BartConfig, BartForConditionalGeneration

    tok = _tokenizer()
    cfg = BartConfig(
        vocab_size=len(tok),
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=256,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.eos_token_id,
        forced_eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    BartForConditionalGeneration(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)
