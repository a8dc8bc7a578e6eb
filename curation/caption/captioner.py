"""Captions from any transformers image-text-to-text model (local weights), batched."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pyarrow as pa

from curation import schema
from curation.base import ModelFileError, Stage, column, set_columns

SOURCE_SIDECAR = "sidecar"
SOURCE_TAR = "tar"


def input_caption_source(tar_offset: int | None) -> str:
    """Where a caption that came with the input was found: a tar member (a row read from a
    tar has its member's `tar_offset`) or a sidecar file (a `#` in a file's name says
    nothing)."""
    return SOURCE_TAR if tar_offset is not None else SOURCE_SIDECAR


def model_name(path: str) -> str:
    """The name a model's captions are credited to: its folder's name."""
    return Path(path.rstrip("/")).name or path


@dataclass(kw_only=True)
class VlmCaptioner(Stage):
    """Caption each thumbnail with a vision-language model (AutoModelForImageTextToText).

    Reads: `thumbnail`, `caption_en`, `caption_source`, `source`. Writes: `caption_en`,
    `caption_source`. A row that came with a caption keeps it (`caption_source` `sidecar` or
    `tar`) unless `sidecar_hint` asks for a model caption with that caption in the prompt, or
    `keep_sidecar` is off. The model's processor must carry a chat template; prompts are
    left-padded and generated greedily in one `generate` call per batch. Resources: one model
    per actor, bf16 on `device` 'cuda', float32 on CPU.
    """

    name: ClassVar[str] = "caption"
    batch_size: ClassVar[int | None] = 8
    reads: ClassVar[tuple[str, ...]] = (
        schema.THUMBNAIL,
        schema.CAPTION_EN,
        schema.CAPTION_SOURCE,
        schema.TAR_OFFSET,
    )
    writes: ClassVar[tuple[str, ...]] = (schema.CAPTION_EN, schema.CAPTION_SOURCE)
    model_path: str = ""
    prompt: str = "Describe this image in one or two detailed sentences."
    max_new_tokens: int = 77
    keep_sidecar: bool = True
    sidecar_hint: bool = False
    hint_template: str = '{prompt} The image came with this caption, which may help: "{hint}"'
    device: str = "cpu"
    min_new_tokens: int = 0
    """Benchmarks only: force every caption to this length (random weights stop at random)."""

    def setup(self) -> None:
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        try:
            self._processor = AutoProcessor.from_pretrained(self.model_path, local_files_only=True)
            self._processor.tokenizer.padding_side = "left"
            model = AutoModelForImageTextToText.from_pretrained(
                self.model_path, local_files_only=True, dtype=dtype
            )
        except Exception as e:  # another kind of model, a folder without its processor, ...
            raise ModelFileError.of(
                "models.caption_model",
                self.model_path,
                "a transformers image-text-to-text model with its processor",
                e,
            ) from e
        self._model = model.to(self.device).eval()
        self._name = model_name(self.model_path)

    def instruction(self, hint: str | None) -> str:
        """The text given with one image."""
        if hint and self.sidecar_hint:
            return self.hint_template.format(prompt=self.prompt, hint=hint)
        return self.prompt

    def generate(self, images: list[Any], instructions: list[str]) -> tuple[list[str], int]:
        """Captions of PIL `images` (one instruction each) and the number of tokens generated."""
        import torch

        texts = [
            self._processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": t}]}],
                add_generation_prompt=True,
            )
            for t in instructions
        ]
        inputs = self._processor(images=images, text=texts, return_tensors="pt", padding=True)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        if "pixel_values" in inputs and self.device.startswith("cuda"):
            inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
        extra = {"min_new_tokens": self.min_new_tokens} if self.min_new_tokens else {}
        with torch.no_grad():
            out = self._model.generate(
                **inputs, max_new_tokens=self.max_new_tokens, do_sample=False, **extra
            )
        new = out[:, inputs["input_ids"].shape[1] :]
        pad = self._processor.tokenizer.pad_token_id
        num_tokens = int((new != pad).sum()) if pad is not None else int(new.numel())
        captions = self._processor.batch_decode(new, skip_special_tokens=True)
        return [c.strip() for c in captions], num_tokens

    def process(self, table: pa.Table) -> pa.Table:
        from PIL import Image

        thumbs = column(table, schema.THUMBNAIL)
        captions = column(table, schema.CAPTION_EN)
        sources = column(table, schema.CAPTION_SOURCE)
        offsets = column(table, schema.TAR_OFFSET)
        todo: list[int] = []
        for i, (thumb, cap) in enumerate(zip(thumbs, captions, strict=True)):
            if cap and not sources[i]:
                sources[i] = input_caption_source(offsets[i])
            if thumb is None:
                continue
            if not cap or not self.keep_sidecar or self.sidecar_hint:
                todo.append(i)
        if todo:
            images = [Image.open(io.BytesIO(thumbs[i])).convert("RGB") for i in todo]
            hints = [captions[i] if self.sidecar_hint else None for i in todo]
            new, _ = self.generate(images, [self.instruction(h) for h in hints])
            for i, h, text in zip(todo, hints, new, strict=True):
                if not text:  # nothing generated: an existing caption stays, else none
                    continue
                captions[i] = text
                sources[i] = f"{self._name}+hint" if h and self.sidecar_hint else self._name
        return set_columns(table, {schema.CAPTION_EN: captions, schema.CAPTION_SOURCE: sources})
