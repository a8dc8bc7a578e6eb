"""The shared training loop with a toy task (a linear model, synthetic batches): no shards."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from torch import nn

from training.config import LoopConfig, OptimConfig, ParallelConfig
from training.parallel import unwrap
from training.trainer import StepOutput, Trainer


class Batches:
    """Eight batches per epoch, each a function of its position; resumable."""

    def __init__(self) -> None:
        self.pos = 0

    def __iter__(self):
        while self.pos < 8:
            self.pos += 1
            x = torch.arange(8.0).reshape(2, 4) / 8 + self.pos
            yield {"x": x, "keys": [f"s{self.pos}a", f"s{self.pos}b"]}
        self.pos = 0

    def state_dict(self) -> dict:
        return {"pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.pos = state["pos"]


class ToyTask:
    """Fit a linear map; 'held-out' metric: the sum of the weights evaluated."""

    name = "toy"
    eval_every = 0

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self.exported: dict[str, torch.Tensor] = {}

    def build(self, info) -> nn.Module:
        self.model = nn.Linear(4, 1)
        return self.model

    def blocks(self) -> list[nn.Module]:
        return []

    def stage_steps(self) -> list[int]:
        return [self.steps]

    def stage_name(self, stage: int) -> str:
        return "all"

    def make_loader(self, stage: int, info) -> Batches:
        return Batches()

    def compute_loss(self, model, batch, stage, generator) -> StepOutput:
        x = batch["x"]
        target = x.sum(dim=1, keepdim=True) + torch.randn(2, 1, generator=generator)
        loss = (model(x) - target).square().mean()
        return StepOutput(loss=loss, num_images=2)

    def evaluate(self, model, step: int) -> dict[str, float]:
        m = unwrap(model)
        return {"weight_sum": float(m.weight.detach().sum() + m.bias.detach().sum())}

    def export(self, state_dict: dict[str, torch.Tensor], folder: Path) -> None:
        self.exported = {k: v.clone() for k, v in state_dict.items()}


def run(out: Path, steps: int = 6, stop_after: int | None = None, **loop) -> tuple:
    task = ToyTask(steps)
    loop_cfg = LoopConfig(**{"output_dir": str(out), "mixed_precision": "no", "device": "cpu",
                             "progress": False, "log_every": 1, **loop})  # fmt: skip
    trainer = Trainer(task, optim=OptimConfig(lr=1e-2), loop=loop_cfg, parallel=ParallelConfig())
    return trainer.run(stop_after=stop_after), task


def test_held_out_metrics_describe_the_exported_ema_weights(tmp_path: Path) -> None:
    """With an EMA, the export saves the EMA weights but the held-out metrics were computed on
    the raw trained weights: the printed PSNR/SSIM did not belong to the saved model."""
    result, task = run(tmp_path, ema_decay=0.5)
    exported = float(task.exported["weight"].sum() + task.exported["bias"].sum())
    raw = float(task.model.weight.detach().sum() + task.model.bias.detach().sum())
    assert abs(exported - raw) > 1e-3  # the EMA lags: the two differ
    assert result.metrics["weight_sum"] == pytest.approx(exported, abs=1e-6)
    # and the trained weights are back in place after the evaluation
    plain, plain_task = run(tmp_path / "plain")
    trained = plain_task.model.weight.detach().sum() + plain_task.model.bias.detach().sum()
    assert plain.metrics["weight_sum"] == pytest.approx(float(trained), abs=1e-6)


def _scalars(folder: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_a_resume_after_a_crash_logs_and_records_each_step_once(tmp_path: Path) -> None:
    """A run killed after its last checkpoint had logged (and recorded the samples of) steps
    past it; the resumed run trains them again. TensorBoard then showed two losses for those
    steps and the sample record listed their batches twice."""
    full, _task = run(tmp_path / "full", record_samples=True)
    out = tmp_path / "crashed"
    # Steps 1-4 logged, checkpoints at 2 and 4; the one at 4 is then lost, as if the process
    # had been killed after logging step 4 but before its checkpoint was complete.
    run(out, stop_after=4, checkpoint_every=2, keep_checkpoints=0, record_samples=True)
    shutil.rmtree(out / "checkpoints" / "step-00000004")
    resumed, _task = run(out, checkpoint_every=2, keep_checkpoints=0, record_samples=True)
    assert resumed.losses == full.losses[2:]
    logged = _scalars(out / "tensorboard", "train/loss")
    assert [s for s, _ in logged] == [1, 2, 3, 4, 5, 6]
    assert [v for _, v in logged] == pytest.approx(full.losses)
    record = (out / "samples-rank0.txt").read_text().splitlines()
    assert record == (tmp_path / "full" / "samples-rank0.txt").read_text().splitlines()
    assert len(record) == 6


def test_a_run_killed_before_its_first_checkpoint_is_recorded_once_by_its_rerun(
    tmp_path: Path,
) -> None:
    """With no checkpoint to resume from, the rerun trains from step 1 again, but kept the
    killed process's sample record and TensorBoard steps: steps 1-3 appeared twice."""
    full, _task = run(tmp_path / "full", record_samples=True)
    out = tmp_path / "killed"
    run(out, stop_after=3, checkpoint_every=0, record_samples=True)
    shutil.rmtree(out / "checkpoints")  # killed before its first checkpoint
    rerun, _task = run(out, record_samples=True)
    assert rerun.losses == full.losses
    assert [s for s, _ in _scalars(out / "tensorboard", "train/loss")] == [1, 2, 3, 4, 5, 6]
    record = (out / "samples-rank0.txt").read_text().splitlines()
    assert record == (tmp_path / "full" / "samples-rank0.txt").read_text().splitlines()


class WiderTask(ToyTask):
    """The toy model with another shape: a changed `model.*` setting."""

    def build(self, info) -> nn.Module:
        self.model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 1))
        return self.model


def test_a_checkpoint_of_another_model_is_one_clear_error(tmp_path: Path) -> None:
    """Resuming with a changed architecture printed DCP's traceback ("Missing key in
    checkpoint state_dict ...")."""
    run(tmp_path, checkpoint_every=2)
    loop_cfg = LoopConfig(output_dir=str(tmp_path), mixed_precision="no", device="cpu",
                          progress=False)  # fmt: skip
    trainer = Trainer(WiderTask(6), optim=OptimConfig(lr=1e-2), loop=loop_cfg,
                      parallel=ParallelConfig())  # fmt: skip
    with pytest.raises(ValueError, match=r"step-00000006 does not fit this model or optimizer"
                                         r" \(.+\); was model\.\* changed\?") as e:  # fmt: skip
        trainer.run()
    assert "\n" not in str(e.value)


def test_resuming_from_an_older_checkpoint_beside_newer_ones_is_refused(tmp_path: Path) -> None:
    """`loop.resume: .../step-00000002` beside step 4 and 6 trained a second continuation into
    the same folder: pruning then kept the old continuation's step 6 over the new step 4, and
    a later `resume: auto` continued the abandoned one."""
    run(tmp_path, checkpoint_every=2, keep_checkpoints=0)
    folder = tmp_path / "checkpoints"
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(ValueError, match=r"newer checkpoints \(step-00000004, step-00000006\)"):
        run(tmp_path, checkpoint_every=2, keep_checkpoints=1, resume=str(folder / "step-00000002"))
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    # the newest one may be named; once the newer ones are moved away, the older one too
    assert run(tmp_path, resume=str(folder / "step-00000006"))[0].step == 6
    for name in ("step-00000004", "step-00000006"):
        shutil.move(folder / name, tmp_path / name)
    resumed, _task = run(tmp_path, checkpoint_every=2, resume=str(folder / "step-00000002"))
    assert resumed.step == 6 and len(resumed.losses) == 4


class ReportOnly:
    """A loader that only reports its buckets (what the DiT checks before building models)."""

    def __init__(self, buckets: dict[str, dict]) -> None:
        self.buckets = buckets

    def report(self) -> dict:
        return {"buckets": self.buckets}


def test_a_bucket_the_dit_cannot_patchify_stops_the_run_before_any_model(
    tmp_path: Path,
) -> None:
    """A manifest bucket of 1000x576 (not the contract's multiples of 64) failed only at its
    first batch, after the models were built, possibly hours into the run."""
    from training.config import DitTrainConfig, load_train_config
    from training.dit_trainer import DitTask
    from training.parallel import DistInfo
    from training.tiny import TINY_DIT

    cfg = load_train_config(DitTrainConfig, check_files=False, data={
        "data": {"root": str(tmp_path)},
        "model": {"architecture": TINY_DIT, "vae": str(tmp_path / "vae")},
        "text": {"source": "encoders", "encoders": str(tmp_path / "te")},
        "loop": {"max_steps": 1},
    })  # fmt: skip
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))

    def task(buckets: dict) -> DitTask:
        return DitTask(cfg, loader_factory=lambda data, rank, world_size: ReportOnly(buckets))

    fine = {"1024x576": {"dropped": None}, "1000x576": {"dropped": "weight 0"}}
    assert isinstance(task(fine).make_loader(0, info), ReportOnly)
    bad = {"1024x576": {"dropped": None}, "1000x576": {"dropped": None}}
    with pytest.raises(ValueError, match=r"not a multiple of 32 px.*: 1000x576 \(1000x576 px\)"):
        task(bad).make_loader(0, info)


def test_the_data_summary_says_how_many_rows_had_no_selection_value() -> None:
    """A stage selecting the top share by `aesthetic` trains only on rows with a score; the
    printed summary said nothing of the rows left out for having none."""
    from training.trainer import data_summary

    report = {
        "buckets": {"1024x576": {"selected": 2}, "576x1024": {"selected": 1}},
        "epoch": {"batches_per_rank": 3},
        "selection": {"column": "aesthetic", "top": 0.05, "ascending": False,
                      "candidates": 60, "without_value": 940, "selected": 3},
    }  # fmt: skip
    assert data_summary(report) == (
        "3 samples in 2 buckets, 3 batches per rank per epoch; top 5% by aesthetic: 3 of the "
        "60 with a value (940 without one left out)")
    report["selection"] = {"column": None}
    assert data_summary(report) == "3 samples in 2 buckets, 3 batches per rank per epoch"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_loop_device_cuda_without_a_gpu_is_a_one_line_user_error(tmp_path: Path) -> None:
    """It was a RuntimeError: the CLI, which prints ValueErrors as one line, showed a
    traceback."""
    with pytest.raises(ValueError, match=r"'loop.device' is 'cuda' but no CUDA device"):
        run(tmp_path, device="cuda")


class SignalAt(Batches):
    """`Batches` that sends this process `signum` as it hands out batch `at` (a preemption)."""

    def __init__(self, at: int, signum: int) -> None:
        super().__init__()
        self.at, self.signum = at, signum

    def __iter__(self):
        for batch in super().__iter__():
            if self.pos == self.at:
                os.kill(os.getpid(), self.signum)
            yield batch


@pytest.mark.parametrize("name", ["SIGTERM", "SIGUSR1"])
def test_a_stop_signal_checkpoints_the_step_in_progress_and_a_rerun_resumes(
    tmp_path: Path, monkeypatch, name: str
) -> None:
    """A cluster's preemption (SIGTERM) or time limit (Slurm's SIGUSR1) killed the process,
    losing every step since the last checkpoint; now the run finishes the step in progress,
    checkpoints it and stops, and a rerun trains on exactly as an uninterrupted run does."""
    signum = getattr(signal, name)
    before = signal.getsignal(signum)
    full, _task = run(tmp_path / "full", checkpoint_every=100)
    monkeypatch.setattr(ToyTask, "make_loader", lambda self, stage, info: SignalAt(3, signum))
    stopped, _task = run(tmp_path / "out", checkpoint_every=100)
    assert stopped.stopped_by == name and stopped.step == 3
    assert stopped.checkpoint == tmp_path / "out" / "checkpoints" / "step-00000003"
    assert stopped.export is None and stopped.losses == full.losses[:3]
    assert signal.getsignal(signum) == before  # the handler is the process's again
    monkeypatch.undo()
    resumed, task = run(tmp_path / "out", checkpoint_every=100)
    assert resumed.stopped_by == "" and resumed.losses == full.losses[3:]
    assert task.exported


class FileTask(ToyTask):
    """ToyTask whose export writes two files, and can fail between them."""

    def __init__(self, steps: int, fail: bool = False) -> None:
        super().__init__(steps)
        self.fail = fail

    def export(self, state_dict: dict[str, torch.Tensor], folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(state_dict, folder / "weights.pt")
        if self.fail:
            raise OSError("disk full")
        (folder / "config.json").write_text(f'{{"steps": {self.steps}}}')


def test_an_export_cut_off_leaves_the_previous_final_folder_whole(tmp_path: Path) -> None:
    """`final/` was written in place: an export that failed (or was killed) between its files
    left a folder of new weights with the old config. Now it is swapped in whole."""
    def train(task: FileTask) -> None:
        loop_cfg = LoopConfig(output_dir=str(tmp_path), mixed_precision="no", device="cpu",
                              progress=False, checkpoint_every=2)  # fmt: skip
        Trainer(task, optim=OptimConfig(lr=1e-2), loop=loop_cfg, parallel=ParallelConfig()).run()

    train(FileTask(4))
    first = torch.load(tmp_path / "final" / "weights.pt")
    with pytest.raises(OSError, match="disk full"):
        train(FileTask(6, fail=True))  # resumes at step 4, trains 2 more, fails mid-export
    assert (tmp_path / "final" / "config.json").read_text() == '{"steps": 4}'
    assert torch.equal(torch.load(tmp_path / "final" / "weights.pt")["weight"], first["weight"])
    assert sorted(p.name for p in tmp_path.iterdir() if "final" in p.name) == ["final"]
    train(FileTask(6))
    assert (tmp_path / "final" / "config.json").read_text() == '{"steps": 6}'
    assert not torch.equal(torch.load(tmp_path / "final" / "weights.pt")["weight"],
                           first["weight"])  # fmt: skip


def test_a_save_cut_off_by_a_kill_is_cleared_by_the_next_save(tmp_path: Path) -> None:
    """A `step-….partial` folder left by a kill mid-save (full model and optimizer state) was
    kept for ever: only the partial of the step being saved was cleared."""
    from training.checkpoint import checkpoint_dir

    run(tmp_path, steps=4, stop_after=2, checkpoint_every=2, keep_checkpoints=0)
    cut = checkpoint_dir(tmp_path) / "step-00000003.partial"
    cut.mkdir()
    (cut / ".metadata").write_bytes(b"half")
    run(tmp_path, steps=4, checkpoint_every=2, keep_checkpoints=0)
    assert sorted(p.name for p in checkpoint_dir(tmp_path).iterdir()) == [
        "step-00000002", "step-00000004"]


@pytest.mark.parametrize("when", ["save", "load"])
def test_ctrl_c_inside_a_checkpoint_save_or_load_is_an_interrupt(
    tmp_path: Path, monkeypatch, when: str
) -> None:
    """DCP turns a KeyboardInterrupt inside `dcp.save` into its own CheckpointException: the
    CLI printed a traceback and exited 1 instead of its one line and 130."""
    import traceback

    from torch.distributed.checkpoint.api import CheckpointException

    import training.checkpoint as ck

    if when == "load":
        run(tmp_path, steps=4, stop_after=2, checkpoint_every=2)

    def interrupted(*args, **kwargs):
        raise CheckpointException("reduce_scatter", {0: (KeyboardInterrupt(),
                                                         traceback.StackSummary())})

    monkeypatch.setattr(ck.dcp, when, interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, steps=4, checkpoint_every=2)

    def failed(*args, **kwargs):
        raise CheckpointException("reduce_scatter", {0: (OSError("disk"),
                                                         traceback.StackSummary())})

    monkeypatch.setattr(ck.dcp, when, failed)
    with pytest.raises(CheckpointException if when == "save" else ValueError):
        run(tmp_path, steps=4, checkpoint_every=2)
