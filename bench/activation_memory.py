"""Benchmark: activation memory per DiT block at 4096², for each activation-checkpointing mode.

What a training step keeps between its forward and its backward is what decides whether a
full-depth model fits a GPU. A step's peak memory does not show it (the peak can fall in the
backward or the optimizer step), so this measures it directly: the CUDA memory still allocated
after one forward (bf16 autocast over fp32 weights, as the trainer runs it), minus what was
allocated before, with cuDNN attention (``model.attention_backend: _native_cudnn``), for
Flux-width models of 1 double + 1 single, 2 + 1 and 1 + 2 blocks. The
differences are one double block's and one single block's activations; the estimate for
19 + 38 blocks is arithmetic from them (stated as such in the output).

Modes (``training.parallel.checkpoint_blocks``): ``none`` (no checkpointing), ``full``,
``keep_attention``, ``keep_attention+matmuls`` (``parallel.keep_attention`` and
``parallel.keep_matmuls``). ``--compile`` compiles each block as the trainer does (the
compiler may save fewer intermediates than eager mode). The backward runs after every
measurement, so each mode's gradients are checked to be finite.

Usage: ``python bench/activation_memory.py --out DIR [--compile]`` (``--tiny``: a CPU smoke
test of the code path; it measures nothing on the CPU).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.model_dit_4k import make_inputs
from model.transformer import FLUX_DEV_CONFIG, UltraFluxTransformer2DModel
from training.dit_trainer import contiguous_attention_grads
from training.parallel import checkpoint_blocks, transformer_blocks
from training.tiny import TINY_DIT

MODES = {  # name: (activation checkpointing, keep_attention, keep_matmuls)
    "none": (False, False, False),
    "full": (True, False, False),
    "keep_attention": (True, True, False),
    "keep_attention+matmuls": (True, True, True),
}
SHAPES = ((1, 1), (2, 1), (1, 2))  # (double, single) blocks
FULL_DEPTH = (19, 38)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def saved_bytes(mode: str, shape: tuple[int, int], args: argparse.Namespace) -> int:
    """Bytes still allocated after one forward of a (double, single)-block model in `mode`."""
    ac, keep_attention, keep_matmuls = MODES[mode]
    arch = dict(TINY_DIT if args.tiny else FLUX_DEV_CONFIG)
    arch["num_layers"], arch["num_single_layers"] = shape
    device = torch.device("cpu" if args.tiny else "cuda")
    torch.manual_seed(0)
    with torch.device(device):
        model = UltraFluxTransformer2DModel(**arch)
    if device.type == "cuda":  # the attention the training benchmarks measure
        torch.backends.cuda.enable_cudnn_sdp(True)
        model.set_attention_backend("_native_cudnn")
        contiguous_attention_grads(model)
    blocks = transformer_blocks(model)
    if ac:
        checkpoint_blocks(blocks, keep_attention=keep_attention, keep_matmuls=keep_matmuls)
    if args.compile:
        for block in blocks:
            block.compile()
    size = 128 if args.tiny else args.size
    inputs = make_inputs(size, size, args.num_text, arch, device)
    cuda = device.type == "cuda"
    gc.collect()  # the previous model: checkpoint wrappers make reference cycles
    if cuda:
        torch.cuda.synchronize()
    before = torch.cuda.memory_allocated() if cuda else 0
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = model(**inputs).sample
    if cuda:
        torch.cuda.synchronize()
    kept = (torch.cuda.memory_allocated() if cuda else 0) - before
    out.float().square().mean().backward()
    for p in model.parameters():
        if p.grad is not None and not torch.isfinite(p.grad).all():
            raise RuntimeError(f"{mode} {shape}: non-finite gradient")
    del model, blocks, out, inputs
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return kept


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--size", type=int, default=4096, help="square image side in pixels")
    parser.add_argument("--num-text", type=int, default=512)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--modes", nargs="*", default=list(MODES), choices=list(MODES))
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    gib = 2**30
    results: dict = {"size": args.size, "compile": args.compile, "modes": {}}
    for mode in args.modes:
        if args.compile:
            torch._dynamo.reset()
        kept = {shape: saved_bytes(mode, shape, args) for shape in SHAPES}
        base = kept[(1, 1)]
        double = kept[(2, 1)] - base
        single = kept[(1, 2)] - base
        rest = base - double - single  # embedders, final layer, the output
        full = rest + FULL_DEPTH[0] * double + FULL_DEPTH[1] * single
        results["modes"][mode] = {
            "kept_gib": {f"{d}+{s}": v / gib for (d, s), v in kept.items()},
            "double_block_gib": double / gib,
            "single_block_gib": single / gib,
            "outside_blocks_gib": rest / gib,
            "full_depth_gib_arithmetic": full / gib,
        }
        log(
            f"{mode}: double block {double / gib:.3f} GiB, single {single / gib:.3f} GiB, "
            f"outside the blocks {rest / gib:.3f} GiB; 19 + 38 blocks (arithmetic) "
            f"{full / gib:.1f} GiB per image"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "activation_memory.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
