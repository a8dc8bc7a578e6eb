import numpy as np
from hypothesis import example, given, settings
from hypothesis import strategies as st

from curation.score.quantiles import share_cut, sketch


@settings(max_examples=60, deadline=None)
@example([0.0] * 8 + [1.0] * 3, [11], 2, 0.96875)
@given(
    st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=1, max_size=400),
    st.lists(st.integers(1, 60), min_size=1, max_size=12),
    st.integers(2, 32),
    st.floats(0.05, 1.0),
)
def test_share_cut_is_within_n_over_k_ranks(values, sizes, k, share):
    """Split into blocks, sketch each, merge: the kept count is off by at most 2N/k (+1): N/k
    from the sketches' ranks, and up to one sketch point's weight where the cut is taken (eight
    0s and three 1s, k=2, share 0.97: the cut falls at 0.5 and keeps 3, not 10)."""
    blocks, i = [], 0
    for s in sizes * 50:
        if i >= len(values):
            break
        blocks.append(values[i : i + s])
        i += s
    cut = share_cut([sketch(b, k) for b in blocks], share, lower_better=False)
    arr = np.array(values)
    n = arr.size
    kept = int((arr >= cut).sum())
    exact = share * n
    small = all(len(b) <= k for b in blocks)
    slack = 1 if small else 2 * n / k + len(blocks) + 1
    assert abs(kept - exact) <= slack + int((arr == cut).sum()), (kept, exact, slack)


def test_share_cut_direction_and_exactness():
    values = list(range(100))
    blocks = [values[:30], values[30:70], values[70:]]
    hi = share_cut([sketch(b, 1024) for b in blocks], 0.3, lower_better=False)
    lo = share_cut([sketch(b, 1024) for b in blocks], 0.3, lower_better=True)
    assert sum(v >= hi for v in values) == 30 and sum(v <= lo for v in values) == 30
    five = [sketch([5.0, 1.0, 3.0], 8), sketch([2.0, 4.0], 8)]
    assert share_cut(five, 0.5, lower_better=False) == 4.0  # floor(2.5) = 2 pass
    assert share_cut(five, 0.5, lower_better=True) == 2.0
    assert share_cut(five, 0.1, lower_better=False) == float("inf")  # none: 0.5 of a value
    assert share_cut([sketch([None, float("nan")], 8)], 0.5, False) is None
