"""English captions translated to Chinese (`caption_zh`) by a local seq2seq model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import pyarrow as pa

from curation import schema
from curation.base import ModelFileError, Stage, column, set_columns

UNLIMITED = 10**9
"""A tokenizer's `model_max_length` above this means it names no limit (transformers puts 1e30)."""


def input_limit(tokenizer: Any, config: Any) -> int | None:
    """The most input tokens the model reads: its tokenizer's limit, or its position table's.

    A tokenizer saved without `model_max_length` truncates nothing, and a caption longer than
    the encoder's learned positions fails inside the model (an IndexError), so the smaller of
    the two known limits applies; None when neither is known (relative positions: T5).
    """
    limits = [int(tokenizer.model_max_length)] if tokenizer.model_max_length < UNLIMITED else []
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            limits.append(value)
            break
    return min(limits) if limits else None


@dataclass(kw_only=True)
class CaptionTranslator(Stage):
    """Translate `caption_en` into `caption_zh` where the latter is missing.

    Any transformers sequence-to-sequence model (AutoModelForSeq2SeqLM: Marian opus-mt-en-zh,
    NLLB, mT5, ...) from a local folder; `prefix` goes before each caption (a T5 task prefix,
    say). A `caption_zh` that came with the input is kept. Reads: `caption_en`, `caption_zh`.
    Writes: `caption_zh`. Resources: one model per actor; bf16 on 'cuda', float32 on CPU.
    """

    name: ClassVar[str] = "translate"
    batch_size: ClassVar[int | None] = 16
    reads: ClassVar[tuple[str, ...]] = (schema.CAPTION_EN, schema.CAPTION_ZH)
    writes: ClassVar[tuple[str, ...]] = (schema.CAPTION_ZH,)
    model_path: str = ""
    prefix: str = ""
    max_new_tokens: int = 128
    device: str = "cpu"

    def setup(self) -> None:
        import torch
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        try:
            self._tokenizer = AutoTokenizer.from_pretrained(self.model_path, local_files_only=True)
            model = AutoModelForSeq2SeqLM.from_pretrained(
                self.model_path, local_files_only=True, dtype=dtype
            )
        except Exception as e:  # another kind of model, a folder without its tokenizer, ...
            raise ModelFileError.of(
                "models.translation_model",
                self.model_path,
                "a transformers sequence-to-sequence model with its tokenizer",
                e,
            ) from e
        self._model = model.to(self.device).eval()
        self._max_length = input_limit(self._tokenizer, self._model.config)

    def translate(self, texts: list[str]) -> list[str]:
        """Translations of `texts`, greedy, in one batch."""
        import torch

        inputs = self._tokenizer(
            [self.prefix + t for t in texts],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=self._max_length,
        ).to(self.device)
        with torch.no_grad():
            out = self._model.generate(
                **inputs, max_new_tokens=self.max_new_tokens, do_sample=False
            )
        return [t.strip() for t in self._tokenizer.batch_decode(out, skip_special_tokens=True)]

    def process(self, table: pa.Table) -> pa.Table:
        en = column(table, schema.CAPTION_EN)
        zh = column(table, schema.CAPTION_ZH)
        todo = [i for i, (e, z) in enumerate(zip(en, zh, strict=True)) if e and not z]
        if todo:
            for i, text in zip(todo, self.translate([en[i] for i in todo]), strict=True):
                zh[i] = text or None  # nothing generated: no caption, not an empty one
        return set_columns(table, {schema.CAPTION_ZH: zh})
