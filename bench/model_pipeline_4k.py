"""Benchmark: one 4096×4096 image end to end through UltraFluxPipeline (50 steps + decode).

Random weights (Flux-size DiT, Flux VAE made F16), bf16, prompt embeddings given (512 T5
tokens), so the text encoders are not timed. Runs the pipeline's own sampling loop with the
resolution-dependent shift and the partitioned VAE decode, for the compiled bf16 transformer
and for compiled fp8 linear layers; reports the denoising time, the decode time, their sum and
peak memory, and how far the fp8 image is from the bf16 one.

Usage: ``python bench/model_pipeline_4k.py --out DIR`` (``--tiny`` runs a CPU smoke test).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers import FlowMatchEulerDiscreteScheduler

from model.fp8 import convert_linears_to_fp8
from model.pipeline import FLUX_SCHEDULER_CONFIG, UltraFluxPipeline
from model.transformer import FLUX_DEV_CONFIG, UltraFluxTransformer2DModel
from model.vae import FLUX_VAE_CONFIG, AutoencoderKLF16


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(args: argparse.Namespace, device: torch.device) -> UltraFluxPipeline:
    dit = dict(FLUX_DEV_CONFIG)
    vae_config = dict(FLUX_VAE_CONFIG)
    if args.tiny:
        dit.update(num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2)
        dit.update(joint_attention_dim=64, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))
        vae_config.update(block_out_channels=[8, 8, 8, 8], norm_num_groups=4)
    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        transformer = UltraFluxTransformer2DModel(**dit).eval().requires_grad_(False)
        vae = AutoencoderKLF16(**vae_config, stride=2).eval().requires_grad_(False)
    torch.set_default_dtype(default_dtype)
    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG)
    pipe = UltraFluxPipeline(scheduler=scheduler, vae=vae, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(
    pipe: UltraFluxPipeline, args: argparse.Namespace, embeds: dict, device: torch.device
) -> tuple[torch.Tensor, dict]:
    """One image; returns the decoded (1, 3, H, W) tensor in [0, 1] and the timings."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t0 = time.perf_counter()
    latents = pipe(
        height=args.height,
        width=args.width,
        num_inference_steps=args.steps,
        guidance_scale=4.0,
        generator=torch.Generator("cpu").manual_seed(0),
        output_type="latent",
        **embeds,
    )
    sync(device)
    t1 = time.perf_counter()
    image = pipe.decode_latents(latents, output_type="pt")
    sync(device)
    t2 = time.perf_counter()
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    return image, {
        "denoise_s": t1 - t0,
        "decode_s": t2 - t1,
        "total_s": t2 - t0,
        "s_per_step": (t1 - t0) / args.steps,
        "peak_mem_gib": peak,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--height", type=int, default=4096)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    device = torch.device("cpu" if args.tiny else "cuda")
    if args.tiny:
        args.height, args.width, args.steps = 256, 384, 3
    pipe = build(args, device)
    config = pipe.transformer.config
    g = torch.Generator("cpu").manual_seed(1)
    embeds = {
        "prompt_embeds": torch.randn(1, 512, config.joint_attention_dim, generator=g),
        "pooled_prompt_embeds": torch.randn(1, config.pooled_projection_dim, generator=g),
    }
    results: dict = {
        "date": time.strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "size": f"{args.width}x{args.height}",
        "steps": args.steps,
    }
    pipe.transformer.fuse_qkv_projections()
    images = {}
    for name in ("bf16_compiled", "fp8_compiled"):
        if name == "fp8_compiled":
            results["num_fp8_layers"] = convert_linears_to_fp8(pipe.transformer)
        if device.type == "cuda":
            torch._dynamo.reset()
            pipe.transformer.set_attention_backend("_native_cudnn")
            pipe.transformer.compile_repeated_blocks(fullgraph=True)
        warm = time.perf_counter()
        pipe(
            height=args.height,
            width=args.width,
            num_inference_steps=2,
            output_type="latent",
            **embeds,
        )
        sync(device)
        log(f"{name}: warm-up (compile) {time.perf_counter() - warm:.1f} s")
        images[name], results[name] = generate(pipe, args, embeds, device)
        log(f"{name}: {results[name]}")
    diff = (images["fp8_compiled"].float() - images["bf16_compiled"].float()).abs()
    results["fp8_vs_bf16_image"] = {
        "mean_abs_diff_8bit": diff.mean().item() * 255,
        "p99_abs_diff_8bit": diff.flatten()[:: max(1, diff.numel() // 10_000_000)]
        .quantile(0.99)
        .item()
        * 255,
        "rel_err": (diff.norm() / images["bf16_compiled"].float().norm()).item(),
    }
    log(f"fp8 vs bf16 image: {results['fp8_vs_bf16_image']}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "model_pipeline_bench.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
