"""How pass 1 is cut into Ray tasks, and the Ray Data settings the job runs under."""

import pytest
import ray.data

from curation.io.readers import FileReader
from pipelines.curate import configure_progress, input_blocks, no_operator_reservation


@pytest.mark.parametrize(("n", "cpus"), [(1, 2), (3, 2), (50, 2), (200, 2), (10_000, 2),
                                         (1_000_000, 64), (500, 64)])
def test_blocks_hold_a_reader_batch_and_feed_every_cpu(n: int, cpus: int) -> None:
    blocks = input_blocks(n, cpus)
    assert 1 <= blocks <= n
    if n >= FileReader.batch_size:
        assert n // blocks >= FileReader.batch_size  # Ray would re-bundle smaller blocks
    if n >= 8 * cpus * FileReader.batch_size:
        assert blocks >= 8 * cpus  # enough tasks that the last wave leaves little idle
    assert n / blocks < 128  # bounded tasks; about 64 inputs per resume file at scale


def test_operator_reservation_is_off_inside_and_restored_after() -> None:
    ctx = ray.data.DataContext.get_current()
    before = ctx.op_resource_reservation_enabled
    with no_operator_reservation(ray.data):
        assert ctx.op_resource_reservation_enabled is False
    assert ctx.op_resource_reservation_enabled == before
    with pytest.raises(RuntimeError), no_operator_reservation(ray.data):
        raise RuntimeError("a failing pass 1")
    assert ctx.op_resource_reservation_enabled == before


def test_operator_progress_only_on_a_terminal() -> None:
    ctx = ray.data.DataContext.get_current()
    saved = (ctx.enable_progress_bars, ctx.enable_operator_progress_bars)
    try:
        configure_progress(ray.data, interactive=False)  # a log: the job's total only
        assert ctx.enable_progress_bars and not ctx.enable_operator_progress_bars
        configure_progress(ray.data, interactive=True)
        assert ctx.enable_progress_bars and ctx.enable_operator_progress_bars
    finally:
        ctx.enable_progress_bars, ctx.enable_operator_progress_bars = saved
