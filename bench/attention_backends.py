"""Benchmark: PyTorch's SDPA attention kernels at the DiT's 4K shape, forward and backward.

The training step at 4096² spends most of its time in attention (16,896 tokens, 24 heads × 128,
bf16), and PyTorch's flash kernel (FlashAttention-2) runs there well below the chip's matmul
peak. This measures each SDPA backend (`flash`, `cudnn`, `efficient`) on that shape with the
tensor layouts the transformer hands it:

- `bhsd`: contiguous (batch, heads, tokens, dim) tensors;
- `bshd`: (batch, tokens, heads, dim) tensors seen through `transpose(1, 2)`, as diffusers'
  default attention passes them after its projections (and the gradient of the output in the
  same layout, as the output projection sends it back);
- `mixed`: contiguous q, k, v and that transposed gradient, as diffusers' `_native_cudnn`
  backend passes them (it makes q, k, v contiguous, not the output's gradient).

Each case runs in its own process (a kernel that faults poisons the CUDA context), after
warm-up: forward ms, forward + backward ms, TFLOP/s (4·S²·D per head forward, 2.5× that
backward), and the largest error of the output and the three gradients against the flash
kernel on the same inputs, relative to the largest reference value.

Usage (device machine): ``python3 bench/attention_backends.py --out DIR``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BACKENDS = ("flash", "cudnn", "efficient")
LAYOUTS = ("bhsd", "bshd", "mixed")


def _tensors(layout: str, s: int, h: int, d: int, seed: int) -> list[Any]:
    import torch

    g = torch.Generator(device="cuda").manual_seed(seed)
    out = []
    for i in range(4):  # q, k, v, grad of the output
        if layout == "bhsd" or (layout == "mixed" and i < 3):
            x = torch.randn(1, h, s, d, device="cuda", dtype=torch.bfloat16, generator=g)
        else:
            x = torch.randn(1, s, h, d, device="cuda", dtype=torch.bfloat16, generator=g)
            x = x.transpose(1, 2)
        out.append(x)
    return out


def _kind(backend: str) -> Any:
    """The SDPA backend enum of a `BACKENDS` name."""
    from torch.nn.attention import SDPBackend

    return {
        "flash": SDPBackend.FLASH_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
    }[backend]


def _run(backend: str, q: Any, k: Any, v: Any, go: Any) -> tuple[Any, ...]:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    with sdpa_kernel([_kind(backend)]):
        o = F.scaled_dot_product_attention(q, k, v)
        torch.autograd.backward(o, go)
    return o.detach(), q.grad, k.grad, v.grad


def case(backend: str, layout: str, s: int, h: int, d: int, iters: int) -> dict[str, Any]:
    """One backend and layout, in this process."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    q, k, v, go = _tensors(layout, s, h, d, seed=0)
    res: dict[str, Any] = {"backend": backend, "layout": layout, "tokens": s}
    got = _run(backend, q, k, v, go)
    torch.cuda.synchronize()
    ref = _run("flash", q, k, v, go)
    res["max_rel_err"] = {
        name: round(float((a.float() - b.float()).abs().max() / b.float().abs().max()), 5)
        for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref, strict=True)
    }
    kind = _kind(backend)

    def timed(fn: Any) -> float:
        for _ in range(2):
            fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(iters):
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return sorted(times)[len(times) // 2]

    def fwd() -> None:
        with torch.no_grad(), sdpa_kernel([kind]):
            F.scaled_dot_product_attention(q, k, v)

    qg, kg, vg = (t.detach().requires_grad_(True) for t in (q, k, v))

    def fwd_bwd() -> None:
        with sdpa_kernel([kind]):
            o = F.scaled_dot_product_attention(qg, kg, vg)
            torch.autograd.backward(o, go)

    f_ms, fb_ms = timed(fwd), timed(fwd_bwd)
    flops_f = 4 * s * s * d * h
    res.update(
        fwd_ms=round(f_ms, 3),
        fwd_bwd_ms=round(fb_ms, 3),
        fwd_tflops=round(flops_f / f_ms / 1e9, 1),
        bwd_tflops=round(2.5 * flops_f / max(fb_ms - f_ms, 1e-6) / 1e9, 1),
        fwd_bwd_tflops=round(3.5 * flops_f / fb_ms / 1e9, 1),
    )
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--tokens", type=int, nargs="+", default=[16384 + 512])
    ap.add_argument("--heads", type=int, default=24)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    ap.add_argument("--case", help=argparse.SUPPRESS)  # backend:layout:tokens, in a child
    args = ap.parse_args()
    if args.case:
        backend, layout, s = args.case.split(":")
        r = case(backend, layout, int(s), args.heads, args.dim, args.iters)
        print("RESULT " + json.dumps(r), flush=True)
        return
    import torch

    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "cudnn": torch.backends.cudnn.version(),
        "cases": [],
    }
    for s in args.tokens:
        for backend in args.backends:
            for layout in LAYOUTS:
                cmd = [sys.executable, __file__, "--case", f"{backend}:{layout}:{s}"]
                cmd += ["--heads", str(args.heads), "--dim", str(args.dim)]
                cmd += ["--iters", str(args.iters)]
                try:
                    p = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
                    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
                    if line:
                        r = json.loads(line[-1][7:])
                    else:
                        err = (p.stderr.strip().splitlines() or ["no output"])[-1]
                        r = {"backend": backend, "layout": layout, "tokens": s, "failed": err}
                except subprocess.TimeoutExpired:
                    r = {"backend": backend, "layout": layout, "tokens": s, "failed": "timeout"}
                print(json.dumps(r), flush=True)
                results["cases"].append(r)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, "attention_backends.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
