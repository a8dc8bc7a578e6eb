import numpy as np
import pytest

from curation.dedup.semantic_dedup import SemanticDedup


def _clusters(n_groups: int, per: int, dim: int = 64, noise: float = 0.01, seed: int = 0):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((n_groups, dim))
    x = np.repeat(centers, per, axis=0) + noise * rng.standard_normal((n_groups * per, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_each_group_keeps_its_best_ranked_copy():
    x = _clusters(5, 4)
    n = len(x)
    rng = np.random.default_rng(1)
    pixels = rng.integers(1, 1000, n).tolist()
    sources = [f"img{i:03d}" for i in range(n)]
    matches = SemanticDedup(threshold=0.95).find(x, pixels, [0] * n, [0.0] * n, [0.0] * n, sources)
    by_index = {m.index: m for m in matches}
    for g in range(5):
        members = list(range(4 * g, 4 * g + 4))
        best = max(members, key=lambda i: (pixels[i], -i))
        assert best not in by_index
        for i in members:
            if i != best:
                assert by_index[i].root == best and by_index[i].similarity >= 0.95
    assert len(matches) == 15


def test_distinct_images_are_not_duplicates_and_threshold_is_inclusive():
    x = _clusters(6, 1)
    zeros = [0] * 6
    assert SemanticDedup(threshold=0.95).find(x, [1] * 6, zeros, zeros, zeros, list("abcdef")) == []
    y = np.stack([x[0], x[0]])
    sims = float(y[0] @ y[1])
    found = SemanticDedup(threshold=sims).find(y, [2, 1], [0, 0], [0, 0], [0, 0], ["a", "b"])
    assert [(m.index, m.root) for m in found] == [(1, 0)]


@pytest.mark.parametrize("exact_max", [10_000, 50])
def test_ivf_index_finds_the_tight_duplicates_the_exact_one_finds(exact_max):
    x = _clusters(40, 3, noise=0.002, seed=2)
    dedup = SemanticDedup(threshold=0.98, exact_max=exact_max)
    assert dedup.index_kind(len(x)) == ("flat" if exact_max > len(x) else "ivf")
    n = len(x)
    found = dedup.find(x, list(range(n)), [0] * n, [0] * n, [0] * n, [str(i) for i in range(n)])
    assert len(found) == 80


def test_of_equally_ranked_copies_the_captioned_one_is_kept():
    """Ranked as pHash de-duplication ranks: a caption breaks a tie before the URI."""
    x = _clusters(1, 3)
    same = [5] * 3
    found = SemanticDedup(threshold=0.9).find(x, same, same, same, same, ["a", "b", "c"],
                                              [1] * 3, [0, 1, 0])  # fmt: skip
    assert sorted((m.index, m.root) for m in found) == [(0, 1), (2, 1)]
    found = SemanticDedup(threshold=0.9).find(x, same, same, same, same, ["a", "b", "c"])
    assert sorted((m.index, m.root) for m in found) == [(1, 0), (2, 0)]
