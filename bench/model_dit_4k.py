"""Benchmark: one UltraFlux (Flux-size) DiT denoising step and the F16 decode at 4096².

Random weights in bf16, one 4096×4096 image (256×256×16 latent → 16,384 image tokens) and 512
text tokens. Variants, run in this order on one model:

- ``eager``: diffusers as shipped (PyTorch SDPA picks its kernel);
- ``eager_cudnn``: cuDNN attention;
- ``compiled``: fused QKV projections, regional ``torch.compile`` of the blocks, cuDNN attention;
- ``compiled_fp8``: as ``compiled`` with e4m3 linear layers in the blocks (model/fp8.py).

For each: seconds per step (median of CUDA-event timings), peak memory, achieved TFLOP/s
(FLOPs counted from the actual matmul shapes plus 4·S²·D per attention) and its fraction of the
bf16 matmul peak measured in the same run. A full 50-step Euler loop runs for the compiled bf16
and fp8 models; their final latents and one-step outputs are compared. Last, the F16 VAE
(Flux VAE config, random weights) decodes 4096² and 6336×2624 latents, partitioned and
(where memory allows) whole.

Usage: ``python bench/model_dit_4k.py --out DIR`` (``--tiny`` runs a CPU smoke test).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.fp8 import Fp8Linear, convert_linears_to_fp8
from model.transformer import FLUX_DEV_CONFIG, UltraFluxTransformer2DModel
from model.vae import FLUX_VAE_CONFIG, AutoencoderKLF16

TINY_DIT = {
    **FLUX_DEV_CONFIG,
    "num_layers": 1,
    "num_single_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 64,
    "pooled_projection_dim": 32,
    "axes_dims_rope": (4, 6, 6),
}
TINY_VAE = {**FLUX_VAE_CONFIG, "block_out_channels": [32, 32, 32, 32], "norm_num_groups": 8}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, num_warmup: int, num_iters: int) -> list:
    """Run ``fn`` ``num_warmup`` times, then return ``num_iters`` wall times in seconds."""
    for _ in range(num_warmup):
        fn()
    sync(device)
    times = []
    for _ in range(num_iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def matmul_peaks(device: torch.device, n: int = 8192) -> dict:
    """Measured dense matmul rates (TFLOP/s) on random data: bf16 and e4m3 (rowwise scaled)."""
    if device.type != "cuda":
        return {"bf16_tflops": float("nan"), "fp8_tflops": float("nan")}
    g = torch.Generator(device).manual_seed(0)
    mats = [torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=g) for _ in range(4)]
    flops = 2 * n**3
    bf16 = timed(lambda: mats[0] @ mats[1], device, 3, 10)
    a8 = mats[2].to(torch.float8_e4m3fn)
    b8 = mats[3].to(torch.float8_e4m3fn).t()
    sa = torch.ones(n, 1, device=device)
    sb = torch.ones(1, n, device=device)
    fp8 = timed(
        lambda: torch._scaled_mm(a8, b8, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16),
        device,
        3,
        10,
    )
    return {
        "bf16_tflops": flops / statistics.mean(bf16) / 1e12,
        "fp8_tflops": flops / statistics.mean(fp8) / 1e12,
    }


def make_inputs(
    height: int, width: int, num_text: int, config: dict, device: torch.device, seed: int = 0
) -> dict:
    """Transformer inputs for one image, as the pipeline builds them (packed F16 latents)."""
    rows, cols = height // 32, width // 32
    g = torch.Generator(device).manual_seed(seed)
    img_ids = torch.zeros(rows, cols, 3, device=device)
    img_ids[..., 1] = torch.arange(rows, device=device)[:, None]
    img_ids[..., 2] = torch.arange(cols, device=device)[None, :]
    dtype = torch.bfloat16
    return {
        "hidden_states": torch.randn(
            1, rows * cols, config["in_channels"], device=device, dtype=dtype, generator=g
        ),
        "encoder_hidden_states": torch.randn(
            1, num_text, config["joint_attention_dim"], device=device, dtype=dtype, generator=g
        ),
        "pooled_projections": torch.randn(
            1, config["pooled_projection_dim"], device=device, dtype=dtype, generator=g
        ),
        "timestep": torch.tensor([0.75], device=device, dtype=dtype),
        "guidance": torch.tensor([4.0], device=device, dtype=dtype),
        "img_ids": img_ids.reshape(-1, 3),
        "txt_ids": torch.zeros(num_text, 3, device=device),
    }


def count_flops(model: torch.nn.Module, inputs: dict, config: dict) -> float:
    """FLOPs of one forward: every matmul from its real shapes, plus attention (4·S²·D)."""
    total = 0

    def hook(module: torch.nn.Module, args: tuple, _out: object) -> None:
        nonlocal total
        rows = args[0].numel() // args[0].shape[-1]
        total += 2 * rows * module.in_features * module.out_features

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, torch.nn.Linear | Fp8Linear)
    ]
    with torch.no_grad():
        model(**inputs)
    for h in handles:
        h.remove()
    return float(total + attention_flops(inputs, config))


def attention_flops(inputs: dict, config: dict) -> float:
    """FLOPs of one forward's attention (4·S²·D per block: QKᵀ and the weighted sum)."""
    seq = inputs["hidden_states"].shape[1] + inputs["encoder_hidden_states"].shape[1]
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    num_blocks = config["num_layers"] + config["num_single_layers"]
    return float(4 * seq * seq * inner * num_blocks)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def denoise(
    model: torch.nn.Module, inputs: dict, num_steps: int, device: torch.device
) -> tuple[torch.Tensor, float]:
    """A full flow-matching Euler loop (Flux schedule with resolution shift); returns latents, s."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from model.pipeline import resolution_shift

    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    mu = resolution_shift(inputs["hidden_states"].shape[1], scheduler.config)
    sigmas = torch.linspace(1.0, 1 / num_steps, num_steps).tolist()
    scheduler.set_timesteps(sigmas=sigmas, mu=mu, device=device)
    latents = inputs["hidden_states"].clone()
    sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        for t in scheduler.timesteps:
            v = model(
                **{**inputs, "hidden_states": latents, "timestep": (t / 1000).expand(1)}
            ).sample
            latents = scheduler.step(v, t, latents, return_dict=False)[0]
    sync(device)
    return latents, time.perf_counter() - t0


def compile_blocks(
    model: torch.nn.Module, inputs: dict, device: torch.device, results: dict
) -> None:
    """Regional torch.compile of the transformer blocks; full graphs if they trace whole."""
    if device.type != "cuda":
        return
    torch._dynamo.reset()
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    model.compile_repeated_blocks(fullgraph=True)
    try:
        with torch.no_grad():
            model(**inputs)
        results.setdefault("compile", "fullgraph")
    except Exception as err:  # a graph break: compile the blocks with breaks allowed
        log(f"fullgraph compile failed ({type(err).__name__}: {err}); retrying with graph breaks")
        results["compile"] = f"graph breaks allowed ({type(err).__name__})"
        torch._dynamo.reset()
        model.compile_repeated_blocks(fullgraph=False)


def bench_transformer(args: argparse.Namespace, device: torch.device, results: dict) -> None:
    config = TINY_DIT if args.tiny else FLUX_DEV_CONFIG
    height, width = (128, 192) if args.tiny else (args.height, args.width)
    torch.manual_seed(0)
    log("building transformer")
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = UltraFluxTransformer2DModel(**config).eval().requires_grad_(False)
    torch.set_default_dtype(default_dtype)
    num_params = sum(p.numel() for p in model.parameters())
    inputs = make_inputs(height, width, args.num_text, config, device)
    num_tokens = inputs["hidden_states"].shape[1]
    flops = count_flops(model, inputs, config)
    results["transformer"] = {
        "num_params": num_params,
        "image_tokens": num_tokens,
        "text_tokens": args.num_text,
        "flops_per_step": flops,
        "variants": {},
    }
    log(f"params {num_params / 1e9:.2f} B, tokens {num_tokens}+{args.num_text}, {flops:.3e} FLOP")
    peak = results["matmul"]["bf16_tflops"]

    def step() -> torch.Tensor:
        with torch.no_grad():
            return model(**inputs).sample

    def run_variant(name: str, num_warmup: int) -> torch.Tensor:
        reset_peak(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        first = time.perf_counter() - t0
        times = timed(step, device, num_warmup, args.iters)
        sec = statistics.median(times)
        out = step()
        entry = {
            "s_per_step": sec,
            "s_per_step_all": times,
            "first_call_s": first,
            "peak_mem_gib": peak_gib(device),
            "tflops": flops / sec / 1e12,
            "frac_of_bf16_peak": flops / sec / 1e12 / peak if peak == peak else float("nan"),
        }
        results["transformer"]["variants"][name] = entry
        log(f"{name}: {sec:.3f} s/step, {entry['tflops']:.0f} TFLOP/s, {peak_gib(device):.1f} GiB")
        save(args, results)
        return out

    out_eager = run_variant("eager", 1)
    model.fuse_qkv_projections()
    if device.type == "cuda" and "compiled_flash" in args.variants:
        compile_blocks(model, inputs, device, results)
        run_variant("compiled_flash", 2)
    if device.type == "cuda":
        model.set_attention_backend("_native_cudnn")
        if "eager_cudnn" in args.variants:
            out_cudnn = run_variant("eager_cudnn", 1)
            results["transformer"]["rel_err_cudnn_vs_eager"] = rel_err(out_cudnn, out_eager)
    compile_blocks(model, inputs, device, results)
    out_bf16 = run_variant("compiled", 2)
    results["transformer"]["rel_err_compiled_vs_eager"] = rel_err(out_bf16, out_eager)
    if args.full_steps:
        lat_bf16, sec = denoise(model, inputs, args.full_steps, device)
        results["transformer"]["variants"]["compiled"]["full_loop_s"] = sec
        log(f"compiled bf16: {args.full_steps} steps in {sec:.1f} s")

    num_fp8 = convert_linears_to_fp8(model)
    results["transformer"]["num_fp8_layers"] = num_fp8
    compile_blocks(model, inputs, device, results)
    out_fp8 = run_variant("compiled_fp8", 2)
    results["transformer"]["rel_err_fp8_vs_bf16_step"] = rel_err(out_fp8, out_bf16)
    results["transformer"]["rel_err_bf16_eager_vs_compiled_step"] = rel_err(out_eager, out_bf16)
    if args.full_steps:
        lat_fp8, sec = denoise(model, inputs, args.full_steps, device)
        results["transformer"]["variants"]["compiled_fp8"]["full_loop_s"] = sec
        results["transformer"]["rel_err_fp8_vs_bf16_final_latents"] = rel_err(lat_fp8, lat_bf16)
        log(f"compiled fp8: {args.full_steps} steps in {sec:.1f} s")
    save(args, results)
    model.to("meta")
    reset_peak(device)


def bench_vae(args: argparse.Namespace, device: torch.device, results: dict) -> None:
    config = TINY_VAE if args.tiny else FLUX_VAE_CONFIG
    torch.manual_seed(0)
    with torch.device(device):
        vae = AutoencoderKLF16(**config, stride=2).to(torch.bfloat16).eval().requires_grad_(False)
    vae.enable_tiling()
    sizes = [(128, 128), (192, 64)] if args.tiny else [(4096, 4096), (2624, 6336)]
    results["vae"] = {}
    for height, width in sizes:
        z = torch.randn(1, 16, height // 16, width // 16, device=device, dtype=torch.bfloat16)
        key = f"{width}x{height}"
        entry = {}
        with torch.no_grad():
            vae.enable_tiling()
            reset_peak(device)
            times = timed(lambda z=z: vae.decode(z).sample, device, 1, args.vae_iters)
            tiled = vae.decode(z).sample
            entry["tiled_s"] = statistics.median(times)
            entry["tiled_peak_mem_gib"] = peak_gib(device)
            vae.disable_tiling()
            reset_peak(device)
            try:
                times = timed(lambda z=z: vae.decode(z).sample, device, 0, 1)
                whole = vae.decode(z).sample
                entry["whole_s"] = statistics.median(times)
                entry["whole_peak_mem_gib"] = peak_gib(device)
                entry["max_abs_diff_tiled_vs_whole"] = (tiled - whole).abs().max().item()
                entry["rel_err_tiled_vs_whole"] = rel_err(tiled, whole)
            except torch.OutOfMemoryError:
                whole = None
                entry["whole"] = "out of memory"
        assert tiled.shape == (1, 3, height, width)
        if args.vae_reference:
            # bf16 decodes against an fp32 whole decode, and fp32 tiled against fp32 whole.
            vae.to(torch.float32)
            with torch.no_grad():
                vae.disable_tiling()
                ref = vae.decode(z.float()).sample
                vae.enable_tiling()
                tiled32 = vae.decode(z.float()).sample
            entry["rel_err_tiled_fp32_vs_whole_fp32"] = rel_err(tiled32, ref)
            entry["max_abs_diff_tiled_fp32_vs_whole_fp32"] = (tiled32 - ref).abs().max().item()
            entry["rel_err_tiled_bf16_vs_whole_fp32"] = rel_err(tiled, ref)
            if whole is not None:
                entry["rel_err_whole_bf16_vs_whole_fp32"] = rel_err(whole, ref)
            entry["output_std"] = ref.std().item()
            del ref, tiled32
            vae.to(torch.bfloat16)
        del tiled
        results["vae"][key] = entry
        log(f"vae {key}: {entry}")
        save(args, results)


def save(args: argparse.Namespace, results: dict) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "model_bench.json").write_text(json.dumps(results, indent=2))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--height", type=int, default=4096)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--num-text", type=int, default=512)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--vae-iters", type=int, default=3)
    parser.add_argument(
        "--vae-reference", action="store_true", help="compare decodes against fp32 (whole)"
    )
    parser.add_argument("--full-steps", type=int, default=50, help="0 skips the full loops")
    parser.add_argument("--skip", nargs="*", default=[], choices=["transformer", "vae"])
    parser.add_argument(
        "--variants",
        nargs="*",
        default=["eager_cudnn"],
        choices=["eager_cudnn", "compiled_flash"],
        help="optional variants besides eager, compiled and compiled_fp8",
    )
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test with tiny models")
    args = parser.parse_args()
    device = torch.device("cpu" if args.tiny else "cuda")
    results: dict = {
        "date": time.strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
    }
    import diffusers

    results["diffusers"] = diffusers.__version__
    results["matmul"] = matmul_peaks(device)
    log(f"matmul peaks: {results['matmul']}")
    if "transformer" not in args.skip:
        bench_transformer(args, device, results)
    if "vae" not in args.skip:
        bench_vae(args, device, results)
    save(args, results)
    print(json.dumps(results, indent=2, default=lambda x: None if math.isnan(x) else x))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
