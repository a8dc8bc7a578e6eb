"""Person/face and safety flags from nudenet's detector (ONNX weights inside its wheel).

nudenet is the opt-in `nsfw` extra: its licence metadata says MIT but the licence file it
ships is AGPL-3.0 (see README). It detects faces (female/male) and exposed or covered body
parts; a person is visible when any of them is found, and the safety score is the highest
score of an exposed intimate part.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pyarrow as pa

from curation import schema
from curation.base import ModelFileError, Stage, column, set_columns

UNSAFE_CLASSES = frozenset(
    {
        "FEMALE_GENITALIA_EXPOSED",
        "MALE_GENITALIA_EXPOSED",
        "FEMALE_BREAST_EXPOSED",
        "ANUS_EXPOSED",
        "BUTTOCKS_EXPOSED",
    }
)
"""Detections that make an image unsafe; their highest score is `nsfw`."""

BUNDLED_MODEL = "320n.onnx"
"""The detector inside nudenet 3.4.2's wheel (input 320x320)."""

MIN_DETECTION_SCORE = 0.2
"""nudenet drops detections below this score, so a 0.0 means 'nothing found above 0.2'."""


def nudenet_available() -> bool:
    """Whether the `nsfw` extra (nudenet and onnxruntime) is installed (found, not imported:
    the driver asks, the actors load them)."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("nudenet", "onnxruntime"))


def scores_of(detections: list[dict]) -> tuple[float, float]:
    """(person score, nsfw score) of one image's detections."""
    person = max((float(d["score"]) for d in detections), default=0.0)
    unsafe = max(
        (float(d["score"]) for d in detections if d["class"] in UNSAFE_CLASSES), default=0.0
    )
    return person, unsafe


@dataclass(kw_only=True)
class NudeNetDetector(Stage):
    """Run nudenet on each thumbnail; write the person and/or safety columns.

    Reads: `thumbnail`. Writes: `person_score` and `character` (when `person`), `nsfw` (when
    `safety`); rows without a thumbnail get nulls. Resources: 1 CPU per actor (onnxruntime,
    one thread), or onnxruntime's CUDA provider where it is installed and `device` is 'cuda'.
    """

    name: ClassVar[str] = "nudenet"
    batch_size: ClassVar[int | None] = 16
    reads: ClassVar[tuple[str, ...]] = (schema.THUMBNAIL,)
    writes: ClassVar[tuple[str, ...]] = (schema.PERSON_SCORE, schema.CHARACTER, schema.NSFW)
    weights: str = ""
    resolution: int = 320
    """Side the detector runs at (nudenet's `inference_resolution`: 320 for 320n, 640 for
    640m)."""
    person: bool = True
    safety: bool = True
    character_threshold: float = 0.5
    device: str = "cpu"

    def sets(self) -> tuple[str, ...]:
        """`person_score` and `character` when `person`, `nsfw` when `safety`."""
        return (*((schema.PERSON_SCORE, schema.CHARACTER) if self.person else ()),
                *((schema.NSFW,) if self.safety else ()))  # fmt: skip

    def setup(self) -> None:
        import nudenet
        import onnxruntime
        from nudenet import NudeDetector

        path = self.weights or str(Path(nudenet.__file__).parent / BUNDLED_MODEL)
        providers = ["CPUExecutionProvider"]
        if self.device.startswith("cuda"):
            providers.insert(0, "CUDAExecutionProvider")
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        try:
            detector = NudeDetector(model_path=path, inference_resolution=self.resolution)
            detector.onnx_session = onnxruntime.InferenceSession(
                path, sess_options=options, providers=providers
            )
        except Exception as e:
            if not self.weights:
                raise
            raise ModelFileError.of(
                "models.nudenet_weights", self.weights, "a nudenet ONNX detector", e
            ) from e
        self._detector = detector

    def process(self, table: pa.Table) -> pa.Table:
        import cv2

        thumbs = column(table, schema.THUMBNAIL)
        rows = [i for i, t in enumerate(thumbs) if t is not None]
        images = [cv2.imdecode(np.frombuffer(thumbs[i], np.uint8), cv2.IMREAD_COLOR) for i in rows]
        person: list[float | None] = [None] * table.num_rows
        unsafe: list[float | None] = [None] * table.num_rows
        if images:
            found = self._detector.detect_batch(images, batch_size=len(images))
            for i, detections in zip(rows, found, strict=True):
                person[i], unsafe[i] = scores_of(detections)
        out: dict[str, list] = {}
        if self.person:
            out[schema.PERSON_SCORE] = person
            out[schema.CHARACTER] = [
                None if p is None else p >= self.character_threshold for p in person
            ]
        if self.safety:
            out[schema.NSFW] = unsafe
        return set_columns(table, out)
