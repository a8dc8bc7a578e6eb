"""Benchmark: full DiT training steps at 4096² through native4k's trainer, on one GPU.

Workload: a Flux-width transformer (3072 wide, 24 heads × 128, Flux-dev's embedders) of reduced
depth (``--double`` + ``--single`` blocks, default 2 + 4), random weights, fp32 master weights,
bf16 autocast, one 4096×4096 image per step (16,384 image tokens) + 512 text tokens.
One step = :meth:`training.trainer.Trainer.train_step` exactly as ``native4k train-dit`` runs it:
the frozen F16 VAE (Flux VAE config, random weights, bf16) encodes the 4096² pixels, timesteps
with the resolution shift, the text embeddings come from a text cache on disk (random values
in the real cache format: T5-XXL width 4096, CLIP pooled 768), forward, the SNR-aware Huber
wavelet loss, backward, gradient clipping, AdamW, LR schedule, EMA. The pixels are synthetic
(random, made on the GPU), or with ``--data DIR`` read from a ``native4k curate`` output by the
trainer's shard loader (``bench/square_shards.py`` makes one in the 4096² bucket).
``--resume-check`` then stops a run at step 2, resumes it from its checkpoint and compares step
3's loss with an uninterrupted run's.

Variants (one process, in order): eager + activation checkpointing (AC); compiled blocks + AC;
compiled without AC; compiled + AC under FSDP2 (one rank, or all ranks under torchrun); ``_sac``:
selective AC that keeps the attention outputs (``parallel.keep_attention``); ``_mm``: selective
AC that also keeps the matrix products' outputs (``parallel.keep_matmuls``); ``_latents``: latents
given (no VAE encode); ``_cudnn``: cuDNN attention. ``--accum N`` runs N micro-batches per
optimizer step (the optimizer, clipping and EMA once per N images). For each:
median s/step over ``--iters`` CUDA-event-timed steps after warm-up, peak memory, and
throughput as model FLOP/s: 3 × the transformer's forward FLOPs (counted from the real matmul
shapes plus 4·S²·D per attention, as ``bench/model_dit_4k.py`` counts them) per step, against
the bf16 matmul peak measured in the same run. The recomputed forward under AC (a 4th forward)
and the VAE encode are real work not counted in model FLOPs; the hardware rate with the
recompute is reported too. The VAE encode is also timed alone.

Usage: ``python bench/train_step_gpu.py --out DIR`` (one GPU), or
``torchrun --nproc-per-node 2 bench/train_step_gpu.py --out DIR --variants fsdp`` (``--tiny``:
a CPU smoke test with tiny models).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.model_dit_4k import attention_flops, count_flops, make_inputs, matmul_peaks
from model.transformer import FLUX_DEV_CONFIG
from model.vae import FLUX_VAE_CONFIG, AutoencoderKLF16
from training.config import DitTrainConfig, load_train_config
from training.dit_trainer import DitTask
from training.tiny import TINY_DIT, TINY_VAE
from training.trainer import Trainer

VARIANTS = (
    "eager_ac",
    "compiled_ac",
    "compiled_noac",
    "fsdp",
    "compiled_ac_latents",
    "compiled_noac_latents",
    "fsdp_latents",
    "compiled_ac_latents_cudnn",
    "compiled_noac_latents_cudnn",
    "eager_noac_latents",
    "eager_noac_latents_cudnn",
    "compiled_sac_latents",
    "compiled_sac_latents_cudnn",
    "fsdp_sac_latents_cudnn",
    "fsdp_sac",
    "fsdp_sac_cudnn",
    "compiled_sac_mm_latents_cudnn",
    "fsdp_sac_mm_latents_cudnn",
    "fsdp_sac_mm_cudnn",
)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class SyntheticPixels:
    """A loader stand-in: one bucket of random pixels in [-1, 1], made on the device."""

    def __init__(self, data, *, rank: int, world_size: int, size: tuple[int, int], device, latents):
        self.size, self.device, self.rank = size, device, rank
        self.batch_size = data.batch_size
        self.latents = latents
        self.served = 0  # batches handed out: the position a checkpoint records

    def __iter__(self):
        w, h = self.size
        g = torch.Generator(self.device).manual_seed(self.rank)
        for i in range(1 << 62):
            skip = i < self.served  # a resumed loader replays its draws up to the position
            if self.latents:
                shape = (self.batch_size, 16, h // 16, w // 16)
                images = {"latents": torch.randn(shape, generator=g, device=self.device)}
            else:
                shape = (self.batch_size, 3, h, w)
                images = {"pixels": torch.rand(shape, generator=g, device=self.device) * 2 - 1}
            if skip:
                continue
            self.served = i + 1
            yield {
                **images,
                "keys": ["k0"] * self.batch_size,
                "captions": [""] * self.batch_size,
                "bucket": f"{w}x{h}",
            }

    def state_dict(self) -> dict:
        return {"served": self.served}

    def load_state_dict(self, state: dict) -> None:
        self.served = int(state["served"])


def write_random_cache(
    folder: Path, seq_len: int, seq_dim: int, pooled_dim: int, keys: list[str] | None = None
) -> None:
    """A text cache in ``native4k encode-text``'s format: random entries for ``keys`` (the
    synthetic loader's ``k0`` by default)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from safetensors.torch import save_file

    keys = keys or ["k0"]
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for name, n in (("empty.safetensors", 1), ("embeds-00000.safetensors", len(keys))):
        save_file(
            {
                "seq": torch.randn(n, seq_len, seq_dim, generator=g).to(torch.bfloat16),
                "pooled": torch.randn(n, pooled_dim, generator=g).to(torch.bfloat16),
            },
            str(folder / name),
        )
    index = {"key": keys, "file": ["embeds-00000.safetensors"] * len(keys)}
    pq.write_table(pa.table({**index, "row": list(range(len(keys)))}), folder / "index.parquet")
    meta = {"max_sequence_length": seq_len, "seq_dim": seq_dim, "pooled_dim": pooled_dim}
    (folder / "meta.json").write_text(json.dumps(meta))


def read_data(root: str, bucket: str) -> tuple[dict[str, float], list[str]]:
    """From a curation output's manifest (read once): `data.bucket_weights` that train on
    `bucket` alone (every other kept bucket at 0), and the keys of the kept samples."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    table = pq.read_table(Path(root) / "manifest", columns=["status", "bucket", "key"])
    kept = table.filter(pc.equal(table["status"], "kept"))
    buckets = set(kept["bucket"].to_pylist())
    if bucket not in buckets:
        raise SystemExit(f"--data {root} has no kept image in bucket {bucket}: {sorted(buckets)}")
    return {b: (1.0 if b == bucket else 0.0) for b in buckets}, kept["key"].to_pylist()


def variant_name(name: str) -> str:
    """`name` if it is a variant :func:`variant_flags` understands (argparse type)."""
    head, *flags = name.split("_")
    known = {"ac", "noac", "sac", "mm", "latents", "cudnn"}
    if head not in ("eager", "compiled", "fsdp") or not set(flags) <= known:
        raise argparse.ArgumentTypeError(f"unknown variant {name!r}: e.g. {', '.join(VARIANTS)}")
    if "noac" in flags and {"sac", "mm"} & set(flags):
        raise argparse.ArgumentTypeError(f"{name!r}: sac and mm need activation checkpointing")
    return name


def variant_flags(name: str) -> tuple[bool, bool, bool, bool, bool]:
    """(compiled, activation checkpointing, keep_attention, keep_matmuls, latents given) of a
    variant."""
    compiled, ac = not name.startswith("eager"), "noac" not in name
    return compiled, ac, "_sac" in name, "_mm" in name, "_latents" in name


def make_trainer(name: str, args: argparse.Namespace, work: Path, **loop) -> tuple:
    """The trainer of variant `name` (not yet set up) and its task; `loop` overrides keys."""
    tiny = args.tiny
    arch = dict(TINY_DIT) if tiny else dict(FLUX_DEV_CONFIG)
    arch["num_layers"], arch["num_single_layers"] = args.double, args.single
    compiled, ac, keep_attention, keep_matmuls, latents = variant_flags(name)
    if args.data is not None and latents:
        raise SystemExit(f"{name}: --data feeds pixels from shards; drop the _latents variants")
    data: dict = {"root": str(work), "batch_size": 1}
    if args.data is not None:
        data = {
            "root": args.data,
            "batch_size": 1,
            "num_workers": args.loader_workers,
            "small_buckets": "pad",
            "bucket_weights": args.bucket_weights,
            "resolution_divisor": 16 if tiny else 1,
        }
    cfg = load_train_config(
        DitTrainConfig,
        data={
            "data": data,
            "model": {
                "architecture": arch,
                "vae": str(work / "vae"),
                "guidance_scale": 4.0,
                "attention_backend": "_native_cudnn" if "_cudnn" in name else "native",
            },
            "text": {
                "source": "cache",
                "cache": str(work / "cache"),
                "max_sequence_length": args.num_text,
            },
            "optim": {"lr": 1e-6, "warmup_steps": 10, "schedule": "cosine"},
            "loop": {
                "output_dir": str(work / name),
                "max_steps": 1000,
                "ema_decay": 0.999,
                "grad_accum_steps": args.accum,
                "device": "cpu" if tiny else "cuda",
                "tensorboard": False,
                "progress": False,
                "resume": "never",
                **loop,
            },
            "parallel": {
                "strategy": "fsdp" if name.startswith("fsdp") else "none",
                "activation_checkpointing": ac,
                "keep_attention": keep_attention,
                "keep_matmuls": keep_matmuls,
                "compile": compiled and not tiny,
            },
        },
    )
    size = (128, 128) if tiny else (args.width, args.height)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device("cpu") if tiny else torch.device("cuda", local)
    factory = None  # --data: the shard loader `native4k train-dit` uses
    if args.data is None:

        def factory(data, rank, world_size):
            return SyntheticPixels(
                data, rank=rank, world_size=world_size, size=size, device=dev, latents=latents
            )

    task = DitTask(cfg, loader_factory=factory)
    trainer = Trainer(task, optim=cfg.optim, loop=cfg.loop, parallel=cfg.parallel)
    return trainer, task


def run_variant(name: str, args: argparse.Namespace, work: Path, results: dict) -> None:
    compiled, ac, keep_attention, keep_matmuls, latents = variant_flags(name)
    size = (128, 128) if args.tiny else (args.width, args.height)
    trainer, task = make_trainer(name, args, work)
    torch._dynamo.reset()
    trainer.setup()
    device = trainer.info.device
    loader = trainer.loaders[0]
    batches = iter(loader)

    def next_batch() -> dict:
        nonlocal batches
        try:
            return next(batches)
        except StopIteration:  # --data: a new epoch of the shards
            batches = iter(loader)
            return next(batches)

    entry: dict = {
        "compiled": compiled,
        "activation_checkpointing": ac,
        "keep_attention": keep_attention,
        "keep_matmuls": keep_matmuls,
        "vae_in_step": not latents,
        "accum": args.accum,
    }
    if "vae_encode_s" not in results and not latents:
        batch = next_batch()
        # The VAE encode alone (part of every step).
        times = []
        for _ in range(4):
            t0 = time.perf_counter()
            task.encode_pixels(batch["pixels"], trainer.generator)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        results["vae_encode_s"] = statistics.median(times[1:])
        log(f"VAE encode {times}")
    fwd = results["flops"]["forward"] * args.accum
    attn = results["flops"]["attention"] * args.accum
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    first = trainer.train_step(next_batch, 0)
    entry["first_step_s"] = time.perf_counter() - t0
    for _ in range(args.warmup):
        trainer.train_step(next_batch, 0)
    times, losses = [], []
    for _ in range(args.iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            loss, *_ = trainer.train_step(next_batch, 0)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            loss, *_ = trainer.train_step(next_batch, 0)
            times.append(time.perf_counter() - t0)
        losses.append(loss)
    sec = statistics.median(times)
    peak = results["matmul"]["bf16_tflops"]
    world = trainer.info.world_size
    model_tflops = 3 * fwd / sec / 1e12
    # Hardware FLOPs: forward and backward, plus the recomputed forward (without its
    # attention, or its products, when they are kept).
    recompute = (0.0 if keep_attention else attn) + (0.0 if keep_matmuls else fwd - attn)
    recompute = recompute if ac else 0.0
    hw_tflops = (3 * fwd + recompute) / sec / 1e12
    entry.update(
        {
            "s_per_step": sec,
            "s_per_step_all": times,
            "first_loss": first[0],
            "losses": losses,
            "model_tflops_per_gpu": model_tflops,
            "model_frac_of_peak": model_tflops / peak if peak == peak else None,
            "hw_tflops_per_gpu": hw_tflops,
            "hw_frac_of_peak": hw_tflops / peak if peak == peak else None,
            "images_per_s": world * args.accum / sec,
            "tokens_per_s": world * args.accum * (size[0] // 32) * (size[1] // 32) / sec,
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30
            if device.type == "cuda"
            else 0.0,
            "world_size": world,
        }
    )
    results["variants"][name] = entry
    if args.profile and name == args.variants[-1] and device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            trainer.train_step(next_batch, 0)
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40)
        print(table)
        (args.out / f"profile_{name}.txt").parent.mkdir(parents=True, exist_ok=True)
        (args.out / f"profile_{name}.txt").write_text(table)
    log(
        f"{name}: {sec:.3f} s/step, model {model_tflops:.0f} TFLOP/s "
        f"({entry['model_frac_of_peak'] or 0:.0%}), hw {hw_tflops:.0f}, "
        f"{entry['peak_mem_gib']:.1f} GiB, first step {entry['first_step_s']:.1f} s, "
        f"loss {losses[-1]:.4g}"
    )
    del trainer, task
    if device.type == "cuda":
        torch.cuda.empty_cache()


def resume_check(name: str, args: argparse.Namespace, work: Path, results: dict) -> None:
    """Stop and resume through `Trainer.run`, as `native4k train-dit` does (torch distributed
    checkpoint: model, optimizer, EMA, schedule, loader position, RNG states): the loss of
    step 3 after stopping at step 2 and resuming, against the same 3 steps uninterrupted."""
    import gc
    import shutil

    from training.parallel import barrier

    common = {"max_steps": 3, "export": False, "checkpoint_every": 0}
    runs: dict[str, list[float]] = {}
    seconds: dict[str, float] = {}
    if int(os.environ.get("RANK", "0")) == 0:
        for d in ("resume_ref", "resume_cut"):
            shutil.rmtree(work / d, ignore_errors=True)
    barrier()
    for label, out, resume, stop in (
        ("uninterrupted", "resume_ref", "never", None),
        ("stopped", "resume_cut", "never", 2),
        ("resumed", "resume_cut", "auto", None),
    ):
        trainer, _ = make_trainer(
            name, args, work, output_dir=str(work / out), resume=resume, **common
        )
        torch._dynamo.reset()
        t0 = time.perf_counter()
        runs[label] = trainer.run(stop_after=stop).losses
        seconds[label] = time.perf_counter() - t0
        del trainer
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        log(f"resume check, {label}: losses {runs[label]} ({seconds[label]:.1f} s)")
    ref, got = runs["uninterrupted"][-1], runs["resumed"][-1]
    results["resume"] = {
        "variant": name,
        "losses": runs,
        "seconds": seconds,
        "next_loss_uninterrupted": ref,
        "next_loss_resumed": got,
        "relative_difference": abs(got - ref) / max(abs(ref), 1e-30),
        "resumed_steps": len(runs["resumed"]),
    }
    log(f"resume check: step 3 loss {got!r} resumed, {ref!r} uninterrupted")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/native4k_train_bench"))
    parser.add_argument("--height", type=int, default=4096)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--num-text", type=int, default=512)
    parser.add_argument("--double", type=int, default=2)
    parser.add_argument("--single", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=6)
    parser.add_argument(
        "--variants",
        nargs="*",
        default=list(VARIANTS),
        type=variant_name,
        help="names as in VARIANTS, or any eager|compiled|fsdp followed by _-joined flags "
        "(ac, noac, sac, mm, latents, cudnn)",
    )
    parser.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument(
        "--data",
        help="a `native4k curate` output: train from its shards (the bucket --width x --height) "
        "with the real loader instead of synthetic pixels",
    )
    parser.add_argument("--loader-workers", type=int, default=4, help="with --data")
    parser.add_argument(
        "--resume-check",
        action="store_true",
        help="after the variants: stop at step 2, resume, compare step 3's loss (first variant)",
    )
    parser.add_argument("--profile", action="store_true", help="profile the last variant")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test with tiny models")
    args = parser.parse_args()
    rank = int(os.environ.get("RANK", "0"))
    work = args.work
    keys = None  # the text cache's entries: the synthetic loader's `k0`, or the kept samples'
    if args.data is not None:
        args.bucket_weights, keys = read_data(args.data, f"{args.width}x{args.height}")
    vae_cfg = dict(TINY_VAE) if args.tiny else {**FLUX_VAE_CONFIG, "stride": 2}
    if rank == 0:
        torch.manual_seed(0)
        AutoencoderKLF16(**vae_cfg).save_pretrained(work / "vae")
        seq_dim = TINY_DIT["joint_attention_dim"] if args.tiny else 4096
        pooled_dim = TINY_DIT["pooled_projection_dim"] if args.tiny else 768
        write_random_cache(work / "cache", args.num_text, seq_dim, pooled_dim, keys)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from training.parallel import barrier, init_distributed

        init_distributed("cpu" if args.tiny else "cuda")
        barrier()
    device = torch.device("cpu" if args.tiny else "cuda")
    import diffusers

    results: dict = {
        "date": time.strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "args": {k: str(v) for k, v in vars(args).items()},
        "variants": {},
    }
    results["matmul"] = matmul_peaks(device)
    log(f"matmul peak {results['matmul']}")
    # Forward FLOPs of the transformer, counted once on an eager bf16 copy (hooks on every
    # Linear; the trained variants are compiled or sharded).
    arch = dict(TINY_DIT) if args.tiny else dict(FLUX_DEV_CONFIG)
    arch["num_layers"], arch["num_single_layers"] = args.double, args.single
    from model.transformer import UltraFluxTransformer2DModel

    with torch.device(device):
        counter = UltraFluxTransformer2DModel(**arch).to(torch.bfloat16)
    size = (128, 128) if args.tiny else (args.height, args.width)
    inputs = make_inputs(size[0], size[1], args.num_text, arch, device)
    results["flops"] = {
        "forward": count_flops(counter, inputs, arch),
        "attention": attention_flops(inputs, arch),
    }
    results["num_params"] = sum(p.numel() for p in counter.parameters())
    log(f"{results['num_params'] / 1e9:.3f} B params, forward {results['flops']['forward']:.3e}")
    del counter, inputs
    for name in args.variants:
        try:
            run_variant(name, args, work, results)
        except (torch.OutOfMemoryError, RuntimeError) as e:
            results["variants"][name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            log(f"{name}: failed: {type(e).__name__}: {str(e)[:300]}")
            traceback.print_exc()
            if isinstance(e, torch.OutOfMemoryError):
                torch.cuda.empty_cache()
            else:
                break  # a CUDA error leaves the context unusable
        if rank == 0:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "train_step_bench.json").write_text(json.dumps(results, indent=2))
    if args.resume_check:
        resume_check(args.variants[0], args, work, results)
        if rank == 0:
            (args.out / "train_step_bench.json").write_text(json.dumps(results, indent=2))
    if rank == 0:
        print(json.dumps({k: v for k, v in results.items() if k != "args"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
