"""Semantic near-duplicates over the shared image embedding (burst shots, nudged cameras).

A global step: every candidate's L2-normalised embedding goes into one faiss index (exact
inner product up to `exact_max` vectors, an IVF index above it), a range search finds every
pair at or above `threshold` cosine similarity, and each image points to its best-ranked
better neighbour; following those pointers gives the kept copy. The rank is the one pHash
de-duplication uses (`near_dup.rank_key`: more pixels, colour over grey, larger file, sharper,
more native, with a caption, smaller URI).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from curation.dedup.near_dup import rank_key

FLOAT32_SLACK = 1e-6
"""Inner products are compared to the threshold up to float32 rounding."""


@dataclass(frozen=True, kw_only=True)
class SemanticMatch:
    """One duplicate: row `index` duplicates row `root` (its neighbour `parent` at `similarity`)."""

    index: int
    parent: int
    root: int
    similarity: float


@dataclass(kw_only=True)
class SemanticDedup:
    """Find semantic duplicates among `N` embeddings (a driver-side step after a barrier).

    Memory: faiss holds the vectors as float32, 4 × dim × N bytes (3 GB per million
    ViT-L/14 embeddings). The IVF index is approximate: a pair whose vectors fall in cells
    that are not probed is missed (`nprobe` of `nlist` cells are searched).
    """

    threshold: float = 0.95
    exact_max: int = 100_000
    nprobe: int = 16

    def index_kind(self, n: int) -> str:
        """'flat' (exact) or 'ivf' (approximate) for `n` vectors."""
        return "flat" if n <= self.exact_max else "ivf"

    def pairs(self, emb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(i, j, similarity) of every ordered pair i != j at or above the threshold."""
        import faiss

        x = np.ascontiguousarray(emb, dtype=np.float32)
        n, d = x.shape
        if n < 2:
            empty = np.zeros(0, dtype=np.int64)
            return empty, empty, np.zeros(0, dtype=np.float32)
        if self.index_kind(n) == "flat":
            index: Any = faiss.IndexFlatIP(d)
        else:
            nlist = int(4 * np.sqrt(n))
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
            rng = np.random.default_rng(0)
            index.train(x[rng.choice(n, size=min(n, 64 * nlist), replace=False)])
            index.nprobe = self.nprobe
        index.add(x)
        # faiss returns inner products strictly above the radius: lower it by float32 rounding
        # so that a pair exactly at the threshold counts.
        lims, sims, ids = index.range_search(x, self.threshold - FLOAT32_SLACK)
        rows = np.repeat(np.arange(n), np.diff(lims.astype(np.int64)))
        keep = ids != rows
        return rows[keep], ids[keep].astype(np.int64), sims[keep]

    def find(
        self,
        emb: np.ndarray,
        pixels: Sequence[Any],
        size_bytes: Sequence[Any],
        sharpness: Sequence[Any],
        native: Sequence[Any],
        sources: Sequence[str],
        colours: Sequence[int] | None = None,
        captioned: Sequence[int] | None = None,
    ) -> list[SemanticMatch]:
        """Every row that has a better-ranked semantic duplicate, with its kept copy
        (`colours`: `near_dup.colour` of each row's mode, all colour when None; `captioned`:
        1 for a row with a caption, none when None)."""
        colours = [1] * len(sources) if colours is None else colours
        captioned = [0] * len(sources) if captioned is None else captioned
        ranked = zip(pixels, size_bytes, sharpness, native, sources, colours, captioned,
                     strict=True)  # fmt: skip
        keys = [rank_key(*r) for r in ranked]
        rows, cols, sims = self.pairs(emb)
        parent: dict[int, tuple[int, float]] = {}
        for i, j, s in zip(rows.tolist(), cols.tolist(), sims.tolist(), strict=True):
            if keys[j] < keys[i] and (i not in parent or keys[j] < keys[parent[i][0]]):
                parent[i] = (j, s)
        out = []
        for i, (p, s) in sorted(parent.items()):
            root = p
            while root in parent:  # ranks strictly improve along the chain: it ends
                root = parent[root][0]
            out.append(SemanticMatch(index=i, parent=p, root=root, similarity=float(s)))
        return out
