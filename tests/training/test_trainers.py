"""Trainer tests: tiny random models train on CPU from shards written by `native4k curate`.

The curation output comes from the session fixture ``curated_shards`` (the real CLI on local
Ray); images are trained at 1/16 of their bucket size (``resolution_divisor``) so a step takes
milliseconds.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from training.config import (
    DitTrainConfig,
    TimestepConfig,
    TrainConfigError,
    VaeTrainConfig,
    load_train_config,
)
from training.dit_trainer import (
    DitTask,
    contiguous_attention_grads,
    sample_timesteps,
    timestep_shift,
    train_dit,
)
from training.text_cache import caption_digest
from training.tiny import TINY_DIT, TINY_VAE, save_tiny_text_encoders, save_tiny_vae
from training.trainer import Trainer

pytestmark = pytest.mark.ray  # curated_shards runs the real curation job on local Ray


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is ~50x faster than two
    threads fighting other processes for the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random VAE and text encoders in the real folder layouts."""
    root = tmp_path_factory.mktemp("tiny_parts")
    return {"vae": save_tiny_vae(root / "vae"), "encoders": save_tiny_text_encoders(root / "te")}


@pytest.fixture(scope="module")
def text_cache(curated_shards: Path, parts: dict, tmp_path_factory) -> Path:
    """A text cache written by the real `native4k encode-text` over the curated shards."""
    from pipelines.cli import main

    out = tmp_path_factory.mktemp("text_cache")
    args = ["encode-text", str(curated_shards), "--encoders", str(parts["encoders"])]
    assert main([*args, "--output", str(out), "--max-sequence-length", "8"]) == 0
    return out


def dit_config(root: Path, parts: dict, out: Path, **sections) -> dict:
    """A tiny-DiT config tree over the curated shards (sections override whole keys)."""
    tree = {
        "data": {"root": str(root), "batch_size": 1, "resolution_divisor": 16},
        "model": {"architecture": TINY_DIT, "vae": str(parts["vae"])},
        "text": {
            "source": "encoders",
            "encoders": str(parts["encoders"]),
            "max_sequence_length": 8,
        },
        "optim": {"lr": 1e-3},
        "loop": {
            "output_dir": str(out),
            "mixed_precision": "no",
            "progress": False,
            "log_every": 1,
            "device": "cpu",
        },
    }
    for k, v in sections.items():
        tree[k] = {**tree.get(k, {}), **v}
    return tree


def test_dit_curriculum_run_and_bit_identical_resume(
    curated_shards: Path, parts: dict, text_cache: Path, tmp_path: Path
) -> None:
    stages = [
        {"name": "all", "steps": 3},
        # Stage 2: a data filter (top half by sharpness) and the noisiest timesteps only.
        {"name": "sharp", "steps": 3, "select_column": "sharpness", "select_top": 0.5,
         "t_min": 0.54, "t_max": 1.0},
    ]  # fmt: skip
    common = {
        "text": {"source": "cache", "cache": str(text_cache), "encoders": None},
        "optim": {"lr": 1e-3, "warmup_steps": 2, "schedule": "cosine"},
    }
    loop = {"ema_decay": 0.9, "checkpoint_every": 4, "keep_checkpoints": 1}
    tree_a = dit_config(curated_shards, parts, tmp_path / "a", loop=loop, **common)
    tree_a["stages"] = stages
    cfg_a = load_train_config(DitTrainConfig, data=tree_a)
    seen_t: list[torch.Tensor] = []
    task_a = DitTask(cfg_a)
    original = sample_timesteps

    def spy(*args, **kwargs):
        t = original(*args, **kwargs)
        seen_t.append((kwargs["t_min"], t))
        return t

    import training.dit_trainer as dt

    dt.sample_timesteps = spy
    try:
        full = Trainer(task_a, optim=cfg_a.optim, loop=cfg_a.loop, parallel=cfg_a.parallel).run()
    finally:
        dt.sample_timesteps = original
    assert full.step == 6 and len(full.losses) == 6
    assert all(t_min == 0.0 for t_min, _ in seen_t[:3])
    assert all(t_min == 0.54 and (t >= 0.54).all() for t_min, t in seen_t[3:])
    # TensorBoard events, one kept checkpoint (the last), the exported transformer.
    assert list((tmp_path / "a" / "tensorboard").glob("events.out.tfevents.*"))
    kept = sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir())
    assert kept == ["step-00000006"]
    from model.transformer import UltraFluxTransformer2DModel

    exported = UltraFluxTransformer2DModel.from_pretrained(full.export / "transformer")
    assert exported.config.num_layers == TINY_DIT["num_layers"]
    assert (full.export / "scheduler" / "scheduler_config.json").is_file()

    # Interrupted after step 4 (a checkpoint in the middle of stage 2), then resumed.
    tree_b = {**tree_a, "loop": {**tree_a["loop"], "output_dir": str(tmp_path / "b")}}
    cfg_b = load_train_config(DitTrainConfig, data=tree_b)
    first = train_dit(cfg_b, stop_after=4)
    assert first.losses == full.losses[:4]
    state = json.loads((first.checkpoint / "rank0.json").read_text())
    assert state["step"] == 4 and state["stage"] == 1 and state["loader"]
    resumed = train_dit(cfg_b)
    saved = yaml.safe_load((tmp_path / "b" / "train_config.yaml").read_text())
    assert saved["stages"][1]["t_min"] == 0.54 and saved["data"]["root"] == str(curated_shards)
    assert resumed.losses == full.losses[4:]  # bit-identical on the CPU
    a = UltraFluxTransformer2DModel.from_pretrained(full.export / "transformer").state_dict()
    b = UltraFluxTransformer2DModel.from_pretrained(resumed.export / "transformer").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


class RepeatOne:
    """A loader that yields the same real batch every time (to overfit it)."""

    def __init__(self, batch: dict, length: int = 4) -> None:
        self.batch, self.length, self.pos = batch, length, 0

    def __iter__(self):
        while self.pos < self.length:
            self.pos += 1
            yield self.batch
        self.pos = 0

    def state_dict(self) -> dict:
        return {"pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.pos = state["pos"]


class FixedDraws(DitTask):
    """The DiT task with the same noise, times and latent sample at every step."""

    def compute_loss(self, model, batch, stage, generator):
        return super().compute_loss(model, batch, stage, torch.Generator().manual_seed(0))


def test_dit_overfits_one_batch(curated_shards: Path, parts: dict, tmp_path: Path) -> None:
    from training.data import BucketedLoader

    tree = dit_config(
        curated_shards,
        parts,
        tmp_path,
        data={"batch_size": 2},
        loop={"max_steps": 20, "tensorboard": False, "export": False, "log_every": 20},
        optim={"lr": 3e-3},
    )
    tree["data"]["bucket_weights"] = {"1024x576": 1.0, "576x1024": 0, "1024x1024": 0, "640x960": 0}
    cfg = load_train_config(DitTrainConfig, data=tree)
    batch = next(iter(BucketedLoader(cfg.data)))
    assert batch["pixels"].shape == (2, 3, 32, 64)
    task = FixedDraws(cfg, loader_factory=lambda data, rank, world_size: RepeatOne(batch))
    result = Trainer(task, optim=cfg.optim, loop=cfg.loop, parallel=cfg.parallel).run()
    assert result.losses[-1] < 0.2 * result.losses[0], result.losses


def test_ddp_and_fsdp_wrappers_keep_the_math(
    curated_shards: Path, parts: dict, tmp_path: Path
) -> None:
    """One rank: DDP (with full activation checkpointing) and FSDP2 (with selective
    checkpointing that keeps the attention) train like the bare model."""
    import torch.distributed as dist

    losses = {}
    try:
        for strategy in ("none", "ddp", "fsdp"):
            tree = dit_config(
                curated_shards,
                parts,
                tmp_path / strategy,
                loop={"max_steps": 3, "tensorboard": False, "export": False},
                parallel={
                    "strategy": strategy,
                    "activation_checkpointing": strategy != "none",
                    "keep_attention": strategy == "fsdp",
                    "keep_matmuls": strategy == "fsdp",
                },
            )
            losses[strategy] = train_dit(load_train_config(DitTrainConfig, data=tree)).losses
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert losses["ddp"] == losses["none"]
    assert losses["fsdp"] == pytest.approx(losses["none"], rel=1e-5)


def test_attention_backend_picks_the_transformers_kernel(
    curated_shards: Path, parts: dict, tmp_path: Path
) -> None:
    """`model.attention_backend` sets diffusers' kernel on every attention of the DiT; the
    math kernel trains like PyTorch's default choice."""
    losses, backends = {}, {}
    for name in ("native", "_native_math"):
        tree = dit_config(
            curated_shards,
            parts,
            tmp_path / name,
            model={"attention_backend": name},
            loop={"max_steps": 2, "tensorboard": False, "export": False},
        )
        cfg = load_train_config(DitTrainConfig, data=tree)
        task = DitTask(cfg)
        trainer = Trainer(task, optim=cfg.optim, loop=cfg.loop, parallel=cfg.parallel)
        losses[name] = trainer.run().losses
        backends[name] = {
            getattr(getattr(m.processor, "_attention_backend", None), "value", None)
            for m in task.transformer.modules()
            if hasattr(m, "processor")
        }
    assert backends["_native_math"] == {"_native_math"}
    assert backends["native"] == {None}  # diffusers' default: SDPA chooses
    assert losses["_native_math"] == pytest.approx(losses["native"], rel=1e-4)


def test_attention_output_gradients_share_one_layout() -> None:
    """`contiguous_attention_grads`: the gradient reaching every attention output is
    contiguous (a single-stream block's is a slice of its concatenation with the MLP branch
    otherwise, which cuDNN's cached backward graphs mistake for a double-stream block's),
    and every parameter's gradient is unchanged."""
    from bench.model_dit_4k import make_inputs
    from model.transformer import UltraFluxTransformer2DModel

    def run(fix: bool) -> tuple[list[bool], dict[str, torch.Tensor]]:
        torch.manual_seed(0)
        model = UltraFluxTransformer2DModel(**TINY_DIT)
        layouts: list[bool] = []

        def watch(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> None:
            out.register_hook(lambda g: layouts.append(g.is_contiguous()))

        for block in model.single_transformer_blocks:  # the gradient of the output itself
            block.attn.register_forward_hook(watch)
        if fix:
            assert contiguous_attention_grads(model) == TINY_DIT["num_single_layers"]
        inputs = make_inputs(64, 64, 4, TINY_DIT, torch.device("cpu"))
        inputs = {k: v.float() for k, v in inputs.items()}
        model(**inputs).sample.square().mean().backward()
        return layouts, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    raw, grads = run(fix=False)
    fixed, fixed_grads = run(fix=True)
    assert raw == [False] * len(raw) and fixed == [True] * len(fixed)
    assert grads.keys() == fixed_grads.keys()
    assert all(torch.equal(grads[n], fixed_grads[n]) for n in grads)


def test_fsdp_two_cpu_processes(curated_shards: Path, parts: dict, tmp_path: Path) -> None:
    """`torchrun --nproc-per-node 2 ... train-dit` on the CPU (gloo) with FSDP2."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    tree = dit_config(
        curated_shards,
        parts,
        out,
        loop={
            "max_steps": 6,
            "tensorboard": False,
            "checkpoint_every": 3,
            "record_samples": True,
            "ema_decay": 0.9,
        },
        parallel={"strategy": "fsdp", "activation_checkpointing": True},
    )
    tree["data"]["small_buckets"] = "pad"
    config = tmp_path / "dit.yaml"
    config.write_text(yaml.safe_dump(tree))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(port),
        "-m",
        "pipelines.cli",
        "train-dit",
        "--config",
        str(config),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "train-dit: 6 steps" in done.stdout
    seen = [
        [line.split() for line in (out / f"samples-rank{r}.txt").read_text().splitlines()]
        for r in (0, 1)
    ]
    assert len(seen[0]) == len(seen[1]) == 6  # the same number of batches on both ranks
    # Within an epoch the ranks' samples are disjoint (and padded batches repeat a rank's own).
    from training.data import BucketedLoader

    data = load_train_config(DitTrainConfig, data=tree).data
    per_epoch = len(BucketedLoader(data, rank=0, world_size=2))
    assert per_epoch == len(BucketedLoader(data, rank=1, world_size=2))
    keys = [{k for batch in ranks[:per_epoch] for k in batch} for ranks in seen]
    assert keys[0] and keys[1] and not keys[0] & keys[1]
    # Both ranks wrote their part of each resumable checkpoint, with their loader position.
    ckpt = out / "checkpoints" / "step-00000006"
    states = [json.loads((ckpt / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [(s["world_size"], s["step"]) for s in states] == [(2, 6), (2, 6)]
    assert len(list(ckpt.glob("*.distcp"))) == 2
    assert (out / "final" / "transformer" / "config.json").is_file()


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from torchvision.models.vgg import make_layers

    from training.losses import VGG16_CFG

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vgg") / "vgg16_random.pth"
    torch.save({f"features.{k}": v for k, v in make_layers(list(VGG16_CFG)).state_dict().items()},
               path)  # fmt: skip
    return path


def test_vae_decoder_post_training(
    curated_shards: Path, parts: dict, vgg_file: Path, tmp_path: Path
) -> None:
    from pipelines.cli import main

    held_out = tmp_path / "held_out"
    held_out.mkdir()
    import numpy as np
    from PIL import Image

    yy, xx = np.mgrid[0:80, 0:96]
    pattern = np.stack([np.sin(xx / 5), np.cos(yy / 7), np.sin((xx + yy) / 9)], axis=-1)
    Image.fromarray(((pattern + 1) * 127.5).astype(np.uint8)).save(held_out / "a.png")
    config = {
        "data": {"root": str(curated_shards), "mode": "crop", "crop_size": 32, "batch_size": 2,
                 "select_column": "flat_fraction", "select_top": 0.5, "select_ascending": True,
                 "small_buckets": "pad"},
        "model": {"pretrained": str(parts["vae"])},
        "loss": {"vgg_weights": str(vgg_file)},
        "eval": {"images": [str(held_out)], "size": 64, "every": 2},
        "optim": {"lr": 1e-3},
        "loop": {"output_dir": str(tmp_path / "out"), "max_steps": 4, "mixed_precision": "no",
                 "progress": False, "log_every": 1, "device": "cpu", "ema_decay": 0.5},
    }  # fmt: skip
    path = tmp_path / "vae.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train-vae", "--config", str(path)]) == 0
    from model.vae import AutoencoderKLF16

    before = AutoencoderKLF16.from_pretrained(parts["vae"]).state_dict()
    after = AutoencoderKLF16.from_pretrained(tmp_path / "out" / "final" / "vae").state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("decoder.") for k in changed)  # the encoder is frozen
    events = list((tmp_path / "out" / "tensorboard").glob("events.out.tfevents.*"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0]))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    for tag in (
        "train/loss",
        "train/l2",
        "train/wavelet",
        "train/perceptual",
        "eval/psnr",
        "eval/ssim",
        "eval/lpips_vgg",
        "train/images_per_s",
        "train/tokens_per_s",
    ):
        assert tag in tags, tag  # fmt: skip
    assert [e.step for e in acc.Scalars("eval/psnr")] == [2, 4]


def test_a_text_cache_for_other_data_stops_the_run_before_it_starts(
    curated_shards: Path, parts: dict, text_cache: Path, tmp_path: Path
) -> None:
    """A cache missing samples (written for other data) or in another language fails at
    set-up, naming the stage and the data; a `KeyError` when the first such batch came, before."""
    import pyarrow.parquet as pq

    meta = json.loads((text_cache / "meta.json").read_text())
    assert meta["data"] == str(curated_shards)  # the data it was written for
    partial = tmp_path / "partial"
    shutil.copytree(text_cache, partial)
    index = pq.read_table(partial / "index.parquet")
    pq.write_table(index.slice(0, index.num_rows - 2), partial / "index.parquet")
    zh = tmp_path / "zh"
    shutil.copytree(text_cache, zh)
    (zh / "meta.json").write_text(json.dumps({**meta, "language": "zh"}))
    recaptioned = tmp_path / "recaptioned"  # the same keys, encoded from other captions
    shutil.copytree(text_cache, recaptioned)
    digests = index.column("caption_sha256").to_pylist()
    digests[3] = caption_digest("a caption the data no longer has")
    pq.write_table(index.set_column(index.schema.get_field_index("caption_sha256"),
                                    "caption_sha256", pa.array(digests)),
                   recaptioned / "index.parquet")  # fmt: skip
    for cache, match in ((partial, r"lacks 2 of the 11 samples stage 'all'.*encode-text on"),
                         (zh, r"caption_zh embeddings, data.caption_language is 'en'"),
                         (recaptioned, r"encoded from other captions for 1 of the 11 samples")):
        out = tmp_path / f"run-{cache.name}"
        tree = dit_config(curated_shards, parts, out, loop={"max_steps": 2},
                          text={"source": "cache", "cache": str(cache), "encoders": None})
        with pytest.raises(ValueError, match=match):
            train_dit(load_train_config(DitTrainConfig, data=tree))
        assert not (out / "train_config.yaml").exists()


def test_encode_text_refuses_what_it_cannot_encode(
    curated_shards: Path, parts: dict, tmp_path: Path, capsys
) -> None:
    """An unfinished output, one that kept nothing, a bad count: one line each, exit 2."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from pipelines.cli import main

    def encode(data: Path, *extra: str) -> int:
        return main(["encode-text", str(data), "--encoders", str(parts["encoders"]),
                     "--output", str(tmp_path / "cache"), *extra])  # fmt: skip

    nothing = tmp_path / "nothing"
    shutil.copytree(curated_shards, nothing)
    for part in (nothing / "manifest").glob("*.parquet"):
        t = pq.read_table(part)
        status = pa.array(["rejected"] * t.num_rows, t.schema.field("status").type)
        pq.write_table(t.set_column(t.schema.get_field_index("status"), "status", status), part)
    assert encode(nothing) == 2
    assert "kept no image" in capsys.readouterr().err
    (nothing / "_SUCCESS").unlink()
    assert encode(nothing) == 2
    assert "the curation job has not finished" in capsys.readouterr().err
    for flag in ("--batch-size", "--max-sequence-length"):
        with pytest.raises(SystemExit):
            encode(curated_shards, flag, "0")
        assert "must be at least 1" in capsys.readouterr().err
    assert encode(curated_shards, "--language", "zh", "--max-sequence-length", "8") == 0
    captured = capsys.readouterr()
    kept = pc.sum(pc.equal(pq.read_table(curated_shards / "manifest").column("status"), "kept"))
    assert f"{kept.as_py()} samples, 0 with a caption_zh" in captured.out
    assert "no sample has a caption_zh" in captured.err
    umask = os.umask(0)
    os.umask(umask)
    for f in (tmp_path / "cache").glob("*.safetensors"):  # shared as the umask says, not 0600
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f
    before = {p.name: p.read_bytes() for p in (tmp_path / "cache").iterdir()}
    # Ctrl-C in a rerun (the encoders interrupted midway) leaves the earlier cache whole
    from training import text_cache

    calls = 0
    real_encode = text_cache.TextEncoders.encode

    def interrupted(self, captions, max_sequence_length):
        nonlocal calls
        calls += 1
        if calls == 3:
            raise KeyboardInterrupt
        return real_encode(self, captions, max_sequence_length)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(text_cache.TextEncoders, "encode", interrupted)
        assert encode(curated_shards, "--max-sequence-length", "8", "--batch-size", "2") == 130
    assert capsys.readouterr().err.endswith("interrupted; " + str(tmp_path / "cache") +
                                            " is as it was; rerun the same command\n")
    assert {p.name: p.read_bytes() for p in (tmp_path / "cache").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "nothing"]  # no staging
    # a folder holding other files, or a file, is never replaced by a cache
    other = tmp_path / "photos"
    other.mkdir()
    (other / "a.jpg").write_bytes(b"x")
    for target in (other, other / "a.jpg"):
        assert main(["encode-text", str(curated_shards), "--encoders", str(parts["encoders"]),
                     "--output", str(target)]) == 2  # fmt: skip
        assert "text cache" in capsys.readouterr().err
    assert (other / "a.jpg").read_bytes() == b"x"


def test_vae_resume_is_bit_identical(
    curated_shards: Path, parts: dict, tmp_path: Path, capsys
) -> None:
    """The frozen encoder is not in a checkpoint; a resume loads the trained decoder, optimizer
    and EMA and continues exactly (it failed on the encoder's missing keys before)."""
    from training.vae_trainer import train_vae

    def config(out: Path) -> VaeTrainConfig:
        return load_train_config(VaeTrainConfig, data={
            "data": {"root": str(curated_shards), "mode": "crop", "crop_size": 32,
                     "batch_size": 2, "small_buckets": "pad"},
            "model": {"pretrained": str(parts["vae"])},
            "loss": {"perceptual_weight": 0.0},
            "optim": {"lr": 1e-3},
            "loop": {"output_dir": str(out), "max_steps": 4, "mixed_precision": "no",
                     "progress": False, "log_every": 1, "device": "cpu", "ema_decay": 0.5,
                     "checkpoint_every": 2},
        })  # fmt: skip

    full = train_vae(config(tmp_path / "a"))
    summary = [line for line in capsys.readouterr().out.splitlines() if "samples in" in line]
    assert summary == ["train-vae: stage 'decoder': 11 samples in 4 buckets, 7 batches per rank "
                       "per epoch; small buckets (pad, under 2): 1024x1024 (1), 640x960 (1)"]
    first = train_vae(config(tmp_path / "b"), stop_after=2)
    assert first.losses == full.losses[:2]
    resumed = train_vae(config(tmp_path / "b"))
    assert resumed.losses == full.losses[2:]  # bit-identical on the CPU
    again = train_vae(config(tmp_path / "b"))  # a finished run resumes to its end: no step
    assert again.step == 4 and again.losses == []
    # A new run (resume: never) over a folder holding another run's checkpoints would have
    # its own pruned as written: it stops before writing anything.
    fresh = config(tmp_path / "a")
    fresh = dataclasses.replace(fresh, loop=dataclasses.replace(fresh.loop, resume="never"))
    before = sorted(p.name for p in (tmp_path / "a").rglob("*"))
    with pytest.raises(ValueError, match=r"already holds another run's checkpoints.*step-00000004"):
        train_vae(fresh)
    assert sorted(p.name for p in (tmp_path / "a").rglob("*")) == before
    # A learning rate changed on resume applies (the checkpoint's optimizer kept the old one)
    # and is reported.
    from training.config import to_dict
    from training.trainer import Trainer
    from training.vae_trainer import VaeTask

    train_vae(config(tmp_path / "c"), stop_after=2)
    changed = config(tmp_path / "c")
    changed = dataclasses.replace(changed, optim=dataclasses.replace(changed.optim, lr=5e-4))
    trainer = Trainer(VaeTask(changed), optim=changed.optim, loop=changed.loop,
                      parallel=changed.parallel, config_dict=to_dict(changed))
    capsys.readouterr()
    assert trainer.run().step == 4
    out = capsys.readouterr().out
    assert ("resuming with changed settings (the optimizer's apply from the next step): "
            "optim.lr: 0.001 → 0.0005\n") in out
    assert trainer.step_lr == 5e-4  # constant schedule, no warm-up
    # Another batching on resume: no exact position exists in the new plan, so the epoch
    # starts again over it, with a line that says so, instead of a crash or a silent skip.
    train_vae(config(tmp_path / "d"), stop_after=2)
    regrouped = config(tmp_path / "d")
    regrouped = dataclasses.replace(regrouped, data=dataclasses.replace(regrouped.data,
                                                                        shuffle_window=1))
    capsys.readouterr()
    assert train_vae(regrouped).step == 4
    assert ("train-vae: selected samples or batching settings (select_*, bucket_weights, "
            "batch_size, shuffle_window, small_buckets) differ") in capsys.readouterr().out
    # The EMA turned on at a resume failed in torch's checkpoint loader ('Missing key in
    # checkpoint state_dict: ema....'): it starts from the checkpoint's weights.
    no_ema = config(tmp_path / "e")
    no_ema = dataclasses.replace(no_ema, loop=dataclasses.replace(no_ema.loop, ema_decay=0.0))
    train_vae(no_ema, stop_after=2)
    assert train_vae(config(tmp_path / "e")).step == 4
    assert "holds no EMA (loop.ema_decay was 0); the EMA starts from its weights" in (
        capsys.readouterr().out)  # fmt: skip


def test_shards_on_s3_without_credentials_are_one_line(
    curated_shards: Path, parts: dict, tmp_path: Path
) -> None:
    """botocore's NoCredentialsError is no OSError: it came out as a traceback."""
    import subprocess
    import sys

    tree = dit_config(curated_shards, parts, tmp_path / "run", loop={"max_steps": 1})
    tree["data"]["root"] = "s3://no-such-bucket/run"
    config = tmp_path / "dit.yaml"
    config.write_text(yaml.safe_dump(tree))
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_EC2_METADATA_DISABLED="true", AWS_CONFIG_FILE=str(tmp_path / "none"),
               AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"))  # fmt: skip
    cmd = [sys.executable, "-m", "pipelines.cli", "train-dit", "--config", str(config)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == (
        "native4k: cannot read s3://no-such-bucket/run: NoCredentialsError: Unable to locate "
        "credentials")
    assert "Traceback" not in done.stderr


def test_config_errors_are_clear(curated_shards: Path, parts: dict, tmp_path: Path) -> None:
    tree = dit_config(curated_shards, parts, tmp_path, loop={"max_steps": 1})
    # A folder of another part, and an empty weights file, are named before any work.
    def with_vae(folder: Path) -> dict:
        return {**tree, "model": {**tree["model"], "vae": str(folder)}}

    other = tmp_path / "transformer"
    shutil.copytree(parts["vae"], other)
    conf = json.loads((other / "config.json").read_text())
    conf["_class_name"] = "FluxTransformer2DModel"
    (other / "config.json").write_text(json.dumps(conf))
    with pytest.raises(TrainConfigError, match=r"'model.vae'.*holds a FluxTransformer2DModel, not"):
        load_train_config(DitTrainConfig, data=with_vae(other))
    empty = tmp_path / "empty_vae"
    shutil.copytree(parts["vae"], empty)
    (empty / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    with pytest.raises(TrainConfigError, match=r"'model.vae': cannot read the weights file"):
        load_train_config(DitTrainConfig, data=with_vae(empty))
    from model.vae import AutoencoderKLF16

    sharded = tmp_path / "sharded_vae"  # an interrupted copy: one shard of the index missing
    AutoencoderKLF16.from_pretrained(parts["vae"]).save_pretrained(sharded, max_shard_size="20KB")
    shards = sorted(sharded.glob("diffusion_pytorch_model-*.safetensors"))
    assert len(shards) >= 2
    load_train_config(DitTrainConfig, data=with_vae(sharded))  # complete: accepted
    shards[1].unlink()
    with pytest.raises(TrainConfigError, match=rf"'model.vae': .*names {shards[1].name}, not"):
        load_train_config(DitTrainConfig, data=with_vae(sharded))
    with pytest.raises(TrainConfigError, match=r"unknown config key 'loop.max_step'"):
        load_train_config(DitTrainConfig, data={**tree, "loop": {"max_step": 1}})
    with pytest.raises(TrainConfigError, match=r"'optim.lr' must be a number"):
        load_train_config(DitTrainConfig, data={**tree, "optim": {"lr": "fast"}})
    with pytest.raises(TrainConfigError, match=r"'optim.lr' must be a finite number"):
        load_train_config(DitTrainConfig, data={**tree, "optim": {"lr": float("nan")}})
    # YAML 1.1 reads 1e-4 (no dot) as text; a learning rate is written that way
    written = load_train_config(DitTrainConfig, data=tree, overrides=["optim.lr=1e-4"])
    assert written.optim.lr == 1e-4
    with pytest.raises(TrainConfigError, match=r"'model.vae'.*config\.json"):
        load_train_config(DitTrainConfig, data={**tree, "model": {**tree["model"], "vae": "/no"}})
    # A backend whose package is missing (flash-attn is not installed here) or a CUDA kernel
    # on the CPU passed validation and ended in a traceback at the first step.
    for backend, why in (("fast", "must be one of"), ("flash_hub", "model hub"),
                         ("flash", "install `flash-attn"), ("_native_cudnn", "on the CPU")):
        model = {**tree["model"], "attention_backend": backend}
        loop = {**tree["loop"], "device": "cpu"}
        with pytest.raises(TrainConfigError, match=rf"'model.attention_backend'.*{why}"):
            load_train_config(DitTrainConfig, data={**tree, "model": model, "loop": loop})
    for keep in ("keep_attention", "keep_matmuls"):
        with pytest.raises(TrainConfigError, match=rf"'parallel.{keep}' needs"):
            load_train_config(DitTrainConfig, data={**tree, "parallel": {keep: True}})
    with pytest.raises(TrainConfigError, match=r"'data' is required"):
        load_train_config(DitTrainConfig, data={k: v for k, v in tree.items() if k != "data"})
    with pytest.raises(TrainConfigError, match=r"stages add up to 3"):
        load_train_config(DitTrainConfig, data={**tree, "stages": [{"steps": 3}]})
    with pytest.raises(TrainConfigError, match=r"data config key 'mode'"):
        load_train_config(DitTrainConfig, data={**tree, "data": {**tree["data"], "mode": "x"}})
    # A bucket the data does not have stops the run before any model is built.
    bad = {**tree, "data": {**tree["data"], "bucket_weights": {"4096x4096": 2.0}}}
    with pytest.raises(ValueError, match="4096x4096"):
        train_dit(load_train_config(DitTrainConfig, data=bad))
    # A stage's own data filter is named as the stage's ('data config key ...' named a key
    # the data section does not have, and no stage).
    staged = {**tree, "loop": {**tree["loop"], "max_steps": 2},
              "stages": [{"name": "all", "steps": 1},
                         {"name": "best", "steps": 1, "select_column": "beauty",
                          "select_top": 0.5}]}  # fmt: skip
    with pytest.raises(ValueError, match=r"^stage 'best': stages\[1\]\.select_column: the "
                                         r"manifest has no 'beauty'"):  # fmt: skip
        train_dit(load_train_config(DitTrainConfig, data=staged))
    vae_tree = {
        "data": {"root": str(curated_shards), "mode": "crop", "crop_size": 32},
        "model": {"architecture": TINY_VAE},
        "loop": {"max_steps": 1},
    }
    with pytest.raises(TrainConfigError, match=r"loss.vgg_weights.*vgg16-397923af"):
        load_train_config(VaeTrainConfig, data=vae_tree)
    with pytest.raises(TrainConfigError, match=r"loss.vgg_weights.*missing\.pth not found"):
        load_train_config(
            VaeTrainConfig,
            data={**vae_tree, "loss": {"vgg_weights": str(tmp_path / "missing.pth")}},
        )


@settings(max_examples=25, deadline=None)
@given(
    tokens=st.sampled_from([64, 1024, 4096, 16384]),
    band=st.tuples(st.floats(0.0, 0.9), st.floats(0.05, 1.0)).filter(lambda b: b[0] + 0.05 < b[1]),
    dist=st.sampled_from(["logit_normal", "uniform"]),
    seed=st.integers(0, 1000),
)
def test_timesteps_stay_in_band(tokens, band, dist, seed) -> None:
    cfg = TimestepConfig(distribution=dist)
    g = torch.Generator().manual_seed(seed)
    t = sample_timesteps(256, tokens, cfg, t_min=band[0], t_max=band[1], generator=g,
                         device=torch.device("cpu"))  # fmt: skip
    assert t.shape == (256,) and t.dtype == torch.float32
    assert (t >= max(band[0], cfg.eps)).all() and (t <= min(band[1], 1 - cfg.eps)).all()


@settings(max_examples=30, deadline=None)
@given(
    shift=st.sampled_from(["resolution", "fixed", "none"]),
    fixed=st.floats(0.5, 8.0),
    points=st.tuples(st.floats(0.0, 1.0), st.floats(1.0, 2.0)),
    tokens=st.sampled_from([256, 1024, 4096, 16384, 21_000]),
)
def test_the_exported_scheduler_samples_with_the_training_shift(shift, fixed, points, tokens):
    """`native4k generate` on an export's scheduler/ shifts its sigmas as training shifted t
    (the export held no scheduler: sampling used whatever folder the user copied)."""
    import types

    from diffusers import FlowMatchEulerDiscreteScheduler

    from model.pipeline import UltraFluxPipeline
    from training.dit_trainer import sampling_schedule

    cfg = TimestepConfig(shift=shift, fixed_shift=fixed, base_shift=points[0],
                         max_shift=points[1])  # fmt: skip
    scheduler = FlowMatchEulerDiscreteScheduler(**sampling_schedule(cfg))
    pipe = types.SimpleNamespace(scheduler=scheduler)  # what the pipeline's sampling reads
    steps = 8
    ran = UltraFluxPipeline._sampling_scheduler(pipe, steps, tokens, None, torch.device("cpu"))
    s = timestep_shift(tokens, cfg)
    base = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64)
    expected = s * base / (1 + (s - 1) * base)
    assert torch.allclose(ran.sigmas[:steps].double(), expected, rtol=1e-5, atol=1e-6)


def test_resolution_shift_moves_timesteps_to_noise() -> None:
    cfg = TimestepConfig()
    # Flux's rule: mu = 0.5 at 256 tokens, 1.15 at 4096, extrapolated to ~3.2 at 16,384.
    assert timestep_shift(256, cfg) == pytest.approx(torch.e**0.5)
    assert timestep_shift(16384, cfg) == pytest.approx(torch.e ** (0.5 + 0.65 / 3840 * 16128))
    means = []
    for tokens in (256, 4096, 16384):
        g = torch.Generator().manual_seed(0)
        means.append(sample_timesteps(4000, tokens, cfg, generator=g, device=torch.device("cpu")))
    assert means[0].mean() < means[1].mean() < means[2].mean()
    fixed = dataclasses.replace(cfg, shift="none", distribution="uniform")
    g = torch.Generator().manual_seed(0)
    t = sample_timesteps(20000, 16384, fixed, t_min=0.2, t_max=0.6, generator=g,
                         device=torch.device("cpu"))  # fmt: skip
    assert abs(t.mean().item() - 0.4) < 0.01  # uniform inside the band without a shift


def test_only_step_folders_are_checkpoints(tmp_path: Path) -> None:
    """A copy such as `step-00000050.bak`, a `.partial` folder or a stray file is no checkpoint
    (`int('00000050.bak')` stopped the run before)."""
    from training.checkpoint import checkpoint_dir, latest_checkpoint

    root = checkpoint_dir(tmp_path)
    for name in ("step-00000004", "step-00000050.bak", "step-00000060.partial", "step-x"):
        (root / name).mkdir(parents=True)
    (root / "step-00000070").write_text("a file")
    assert latest_checkpoint(tmp_path) == root / "step-00000004"


def test_ctrl_c_ends_with_one_line_that_says_how_to_resume(
    curated_shards: Path, parts: dict, tmp_path: Path, monkeypatch, capsys
) -> None:
    import training.dit_trainer as dt
    from pipelines.cli import main

    def interrupted(cfg, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(dt, "train_dit", interrupted)
    path = tmp_path / "dit.yaml"
    tree = dit_config(curated_shards, parts, tmp_path / "out", loop={"max_steps": 2})
    path.write_text(yaml.safe_dump(tree))
    assert main(["train-dit", "--config", str(path)]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["native4k train-dit: interrupted; rerun the same command to resume from the "
                   "start (no checkpoint yet)"]
    import training.config as tc

    def early(*args, **kwargs):  # Ctrl-C while the config loads (diffusers' import, ~2 s)
        raise KeyboardInterrupt

    monkeypatch.setattr(tc, "load_train_config", early)
    assert main(["train-dit", "--config", str(path)]) == 130
    assert capsys.readouterr().err == "native4k train-dit: interrupted before training started\n"


def test_held_out_images_that_cannot_serve_are_named(tmp_path: Path, capsys) -> None:
    from PIL import Image

    from training.vae_trainer import _load_eval_images

    Image.new("RGB", (80, 70), "red").save(tmp_path / "good.png")
    Image.new("RGB", (40, 40), "red").save(tmp_path / "small.png")
    (tmp_path / "notes.png").write_text("not an image")
    (crop,) = _load_eval_images([str(tmp_path)], 64, 8)
    assert crop.shape == (3, 64, 64)
    assert capsys.readouterr().out == (
        "train-vae: eval.images skipped 1 unreadable (notes.png); 1 smaller than 64px "
        "(small.png)\n")
    (tmp_path / "good.png").unlink()
    with pytest.raises(ValueError, match=r"eval.images: no usable held-out image: 1 unreadable"):
        _load_eval_images([str(tmp_path)], 64, 8)


def test_held_out_images_are_decoded_as_training_batches_are(tmp_path: Path) -> None:
    """Held-out images went through PIL's `convert("RGB")`, which clips 16-bit grey: a grey
    PNG was evaluated as a white square, and PSNR/SSIM were reported on it. A folder of only
    AVIF (or of no image at all) gave no held-out image and no word."""
    import numpy as np
    from PIL import Image

    from training.data import to_rgb8
    from training.vae_trainer import _load_eval_images, image_suffixes

    grey = (np.arange(96 * 96, dtype=np.uint16).reshape(96, 96) * 7).astype(np.uint16)
    Image.fromarray(grey).save(tmp_path / "grey16.png")  # 16-bit grey (I;16)
    (crop,) = _load_eval_images([str(tmp_path / "grey16.png")], 64, 8)
    with Image.open(tmp_path / "grey16.png") as im:
        want = to_rgb8(im)[16:80, 16:80].astype(np.float32) / 127.5 - 1
    assert np.allclose(crop.permute(1, 2, 0).numpy(), want)
    assert float(crop.std()) > 0.1  # not a flat white square
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no image here")
    with pytest.raises(ValueError, match=r"eval.images: no image file in .*empty"):
        _load_eval_images([str(empty)], 64, 8)
    assert {".png", ".jpg", ".webp", ".tif"} <= image_suffixes()


def test_train_demo_runs_again(curated_shards: Path, tmp_path: Path, capsys) -> None:
    """`make train-demo` twice: the second run trains afresh instead of being refused by the
    guard against training over another run's checkpoints."""
    from pipelines import train_demo

    argv = ["--data", str(curated_shards), "--work", str(tmp_path / "train")]
    for _ in range(2):
        assert train_demo.main(argv) == 0
        assert "native4k train-dit: 8 steps" in capsys.readouterr().out


def test_sigterm_to_torchrun_checkpoints_both_ranks_at_one_step(
    curated_shards: Path, parts: dict, tmp_path: Path
) -> None:
    """A preempted `torchrun` job (SIGTERM to the launcher, which passes it to every rank)
    lost every step since its last checkpoint; now both ranks stop after the same step, save
    it, and exit 143; a rerun resumes from it."""
    import signal
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "run"
    tree = dit_config(curated_shards, parts, out, loop={
        "max_steps": 10_000, "tensorboard": False, "checkpoint_every": 0, "record_samples": True,
    }, parallel={"strategy": "fsdp"})  # fmt: skip
    tree["data"]["small_buckets"] = "pad"
    config = tmp_path / "dit.yaml"
    config.write_text(yaml.safe_dump(tree))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(port), "-m", "pipelines.cli", "train-dit", "--config",
           str(config)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)  # fmt: skip
    record = out / "samples-rank0.txt"
    deadline = time.monotonic() + 300
    while not (record.is_file() and len(record.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode != 0
    saved = sorted((out / "checkpoints").iterdir())
    assert len(saved) == 1, (saved, stderr[-3000:])
    step = json.loads((saved[0] / "rank0.json").read_text())["step"]
    states = [json.loads((saved[0] / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [s["step"] for s in states] == [step, step] and 2 <= step < 10_000
    assert f"stopped by SIGTERM after step {step}" in stderr
    # The rerun resumes there (and is told to stop one step later).
    done = subprocess.run([*cmd, "--set", f"loop.max_steps={step + 1}"], capture_output=True,
                          text=True, env=env, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"at step {step}" in done.stdout and f"train-dit: {step + 1} steps" in done.stdout


def test_a_killed_encode_text_leaves_no_staging_folder_behind(tmp_path: Path) -> None:
    """A SIGTERM'd `encode-text` left `.cache.tmp-PID` (gigabytes for a large dataset) that
    no later run removed; a write of a process that is gone is removed by the next one."""
    import os
    import subprocess

    from training.folders import remove_orphans

    proc = subprocess.Popen(["true"])
    proc.wait()  # its pid is now nobody's
    writer = subprocess.Popen(["sleep", "60"])  # another process, writing
    try:
        dead = tmp_path / f".cache.tmp-{proc.pid}"
        live = tmp_path / f".cache.tmp-{writer.pid}"
        other = tmp_path / f".cache2.tmp-{proc.pid}"  # another cache's: not this one's to judge
        mine = tmp_path / f".cache.tmp-{os.getpid()}"  # this pid's, before this write began
        for folder in (tmp_path / "cache", dead, live, other, mine,
                       tmp_path / f".cache.old-{proc.pid}"):  # fmt: skip
            folder.mkdir()
            (folder / "embeds-0.safetensors").write_bytes(b"x")
        remove_orphans(tmp_path / "cache")
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            ["cache", live.name, other.name])
    finally:
        writer.kill()
        writer.wait()


def test_a_writer_killed_between_its_renames_gets_its_previous_folder_back(
    tmp_path: Path,
) -> None:
    """Killed after moving the old folder aside and before moving the new one in: the target
    is missing, and the next writer puts the old version back rather than deleting it."""
    import subprocess

    from training.folders import remove_orphans, replace_folder, staging_folder

    proc = subprocess.Popen(["true"])
    proc.wait()
    aside = tmp_path / f".final.old-{proc.pid}"
    aside.mkdir()
    (aside / "weights").write_text("previous")
    new = staging_folder(tmp_path / "final")  # clears orphans first: the old one is restored
    assert (tmp_path / "final" / "weights").read_text() == "previous"
    (new / "weights").write_text("next")
    replace_folder(new, tmp_path / "final")
    assert (tmp_path / "final" / "weights").read_text() == "next"
    assert [p.name for p in tmp_path.iterdir()] == ["final"]
    remove_orphans(tmp_path / "final")  # nothing left to clear
    assert [p.name for p in tmp_path.iterdir()] == ["final"]


def test_two_stages_over_the_same_data_draw_different_orders(
    curated_shards: Path, parts: dict, tmp_path: Path
) -> None:
    """Each stage builds a fresh loader from epoch 0; with one data seed, a stage over the
    same data as the one before it replayed exactly the same sample order."""
    from training.config import DitTrainConfig, load_train_config
    from training.dit_trainer import DitTask, stage_seed
    from training.parallel import DistInfo

    tree = dit_config(curated_shards, parts, tmp_path / "out", data={"seed": 7},
                      loop={"max_steps": 4})  # fmt: skip
    tree["stages"] = [{"name": "a", "steps": 2}, {"name": "b", "steps": 2}]
    cfg = load_train_config(DitTrainConfig, data=tree)
    task = DitTask(cfg)
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    orders = []
    for stage in (0, 1):
        loader = task.make_loader(stage, info)
        orders.append([key for batch in loader for key in batch["keys"]])
    assert sorted(orders[0]) == sorted(orders[1]) and len(orders[0]) > 3
    assert orders[0] != orders[1]
    assert stage_seed(7, 0) == 7  # the first stage keeps the configured seed
    assert len({stage_seed(7, s) for s in range(50)}) == 50


def test_a_leftover_of_this_very_pid_is_cleared_and_a_users_files_are_carried_over(
    tmp_path: Path,
) -> None:
    """Containers repeat pids across restarts: a `.final.old-<pid>` left by a killed run with
    this process's pid was taken for this process's own and kept, and the next swap failed
    on it (`Directory not empty`). And files a user put in `final/` beside the export stay."""
    import os

    from training.folders import replace_folder, staging_folder

    target = tmp_path / "final"
    (target / "transformer").mkdir(parents=True)
    (target / "transformer" / "w").write_text("old weights")
    (target / "text_encoder").mkdir()
    (target / "text_encoder" / "t").write_text("the user's")
    stale = tmp_path / f".final.old-{os.getpid()}"
    stale.mkdir()
    (stale / "x").write_text("a killed run's")
    new = staging_folder(target)
    assert not stale.exists()  # cleared, not taken for this write's own
    (new / "transformer").mkdir()
    (new / "transformer" / "w").write_text("new weights")
    replace_folder(new, target, carry_over=True)
    assert (target / "transformer" / "w").read_text() == "new weights"
    assert (target / "text_encoder" / "t").read_text() == "the user's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
