"""One open_clip image embedding per image, and the cheap heads that read it.

The embedding (L2-normalised) feeds LAION's aesthetic MLP, a safety MLP and zero-shot prompt
classifiers (`person_score` / `character`), and is kept for semantic de-duplication and the
training loader's selection (`OUT/embeddings`).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa

from curation import schema
from curation.base import ModelFileError, Stage, column, set_columns


def resolve_clip_model(model: str) -> str:
    """An open_clip architecture name; a local JSON config file is registered first.

    `model` is either a name open_clip knows (`ViT-L-14`) or the path of a model config JSON
    (registered with `open_clip.add_model_config`, named after the file's stem), so a custom
    architecture needs no code and every Ray worker registers it by itself.
    """
    import open_clip

    path = Path(model)
    if model.endswith(".json") and path.is_file():
        # Checked before open_clip sees it: a registered file that is no JSON stays in
        # open_clip's list and fails every later registration in this process.
        config = json.loads(path.read_text())
        missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg")
                   if not isinstance(config, dict) or k not in config]  # fmt: skip
        if missing:
            raise ValueError(f"not an open_clip model config (no {', '.join(missing)})")
        open_clip.add_model_config(path)
        return path.stem
    return model


@dataclass(kw_only=True)
class ClipEmbedder(Stage):
    """Embed each thumbnail with open_clip and apply the configured heads.

    Reads: `thumbnail` (rows without one get nulls). Writes: `embedding` (float32, L2-normalised)
    and, when configured, `aesthetic` (LAION MLP), `nsfw` (safety MLP), `person_score` and
    `character` (zero-shot prompts: softmax mass of the person prompts). Columns of heads that
    are not configured are left untouched, so another stage may provide them. Resources: one
    model per actor; `device` 'cuda' when the pipeline gives the actor a GPU.
    """

    name: ClassVar[str] = "embed"
    batch_size: ClassVar[int | None] = 32
    reads: ClassVar[tuple[str, ...]] = (schema.THUMBNAIL,)
    writes: ClassVar[tuple[str, ...]] = (
        schema.EMBEDDING,
        schema.AESTHETIC,
        schema.NSFW,
        schema.PERSON_SCORE,
        schema.CHARACTER,
    )
    model: str = "ViT-L-14"
    weights: str = ""
    aesthetic_weights: str = ""
    safety_weights: str = ""
    person_prompts: list[str] = field(default_factory=list)
    other_prompts: list[str] = field(default_factory=list)
    character_threshold: float = 0.5
    device: str = "cpu"

    def setup(self) -> None:
        import open_clip
        import torch

        from curation.score.heads import load_aesthetic, load_safety

        assert self.weights, "ClipEmbedder needs a local weight file (never random weights)"
        try:
            name = resolve_clip_model(self.model)
        except Exception as e:  # a JSON file that is not an open_clip config
            raise ModelFileError.of(
                "models.clip_model", self.model, "an open_clip model config", e
            ) from e
        if name not in open_clip.list_models():
            raise ModelFileError(
                f"models.clip_model: {self.model} is neither an open_clip architecture nor a "
                "model config JSON file (`open_clip.list_models()` names the architectures)"
            )
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=self.weights, device=self.device
            )
        except Exception as e:  # a truncated file, another architecture's weights, ...
            raise ModelFileError.of(
                "models.clip_weights", self.weights, f"open_clip {name} weights", e
            ) from e
        self._model = model.eval()
        self._preprocess = preprocess
        self._dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        dim = int(model.visual.output_dim)
        self._aesthetic = self._head(
            "models.aesthetic_weights", self.aesthetic_weights, load_aesthetic, name, dim
        )
        self._safety = self._head(
            "models.safety_weights", self.safety_weights, load_safety, name, dim
        )
        self._text = None
        if self.person_prompts:
            tokenizer = open_clip.get_tokenizer(name)
            prompts = [*self.person_prompts, *self.other_prompts]
            with torch.no_grad():
                text = model.encode_text(tokenizer(prompts).to(self.device)).float()
            self._text = text / text.norm(dim=-1, keepdim=True)
            self._scale = float(model.logit_scale.detach().exp())
        self._active = [
            schema.EMBEDDING,
            *([schema.AESTHETIC] if self._aesthetic is not None else []),
            *([schema.NSFW] if self._safety is not None else []),
            *([schema.PERSON_SCORE, schema.CHARACTER] if self._text is not None else []),
        ]

    def sets(self) -> tuple[str, ...]:
        """The embedding, and each head's column when its weights or prompts are set."""
        return (
            schema.EMBEDDING,
            *([schema.AESTHETIC] if self.aesthetic_weights else []),
            *([schema.NSFW] if self.safety_weights else []),
            *([schema.PERSON_SCORE, schema.CHARACTER] if self.person_prompts else []),
        )

    def _head(self, setting: str, path: str, load: Any, name: str, dim: int) -> Any:
        """A head over the embedding from `path` (None when unset), moved to the device."""
        if not path:
            return None
        what = "a LAION aesthetic MLP" if setting == "models.aesthetic_weights" else "a safety head"
        try:
            return load(path, dim).to(self.device)
        except Exception as e:
            raise ModelFileError.of(setting, path, f"{what} for {name} ({dim}-wide)", e) from e

    def embed_pixels(self, pixels_B3HW: Any) -> dict[str, Any]:
        """Embedding and head outputs of a batch of preprocessed pixels (a torch tensor)."""
        import torch

        with (
            torch.no_grad(),
            torch.autocast(
                self.device.split(":")[0], dtype=self._dtype, enabled=self._dtype != torch.float32
            ),
        ):
            emb = self._model.encode_image(pixels_B3HW.to(self.device)).float()
        emb = emb / emb.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        out: dict[str, Any] = {schema.EMBEDDING: emb}
        with torch.no_grad():
            if self._aesthetic is not None:
                out[schema.AESTHETIC] = self._aesthetic(emb)
            if self._safety is not None:
                out[schema.NSFW] = self._safety(emb)
            if self._text is not None:
                probs = (self._scale * emb @ self._text.T).softmax(dim=-1)
                out[schema.PERSON_SCORE] = probs[:, : len(self.person_prompts)].sum(dim=-1)
        return out

    def process(self, table: pa.Table) -> pa.Table:
        import torch
        from PIL import Image

        thumbs = column(table, schema.THUMBNAIL)
        rows = [i for i, t in enumerate(thumbs) if t is not None]
        result: dict[str, list[Any]] = {c: [None] * table.num_rows for c in self._active}
        if rows:
            pixels = torch.stack(
                [self._preprocess(Image.open(io.BytesIO(thumbs[i])).convert("RGB")) for i in rows]
            )
            out = {k: v.float().cpu().numpy() for k, v in self.embed_pixels(pixels).items()}
            for name, values in out.items():
                for j, i in enumerate(rows):
                    v = values[j]
                    result[name][i] = v.tolist() if name == schema.EMBEDDING else float(v)
        if schema.PERSON_SCORE in result:
            result[schema.CHARACTER] = [
                None if p is None else bool(p >= self.character_threshold)
                for p in result[schema.PERSON_SCORE]
            ]
        return set_columns(table, result)


def embedding_array(values: list[list[float] | None]) -> np.ndarray:
    """Rows of embeddings as one float32 matrix (all rows must be present)."""
    return np.asarray(values, dtype=np.float32)
