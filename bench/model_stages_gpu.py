"""GPU benchmark of the model stages: 4K JPEG → aesthetic + safety scores, and captions.

Part 1, scoring, decode included: real 4K JPEGs (bytes in memory, cycled to `--num` images)
are decoded and scored by `ClipEmbedder` (open_clip ViT-L/14, random weights, bf16) with
its LAION-layout aesthetic MLP and a safety MLP (random weights). Measured apart, then
together:

- the model alone on ready 224² tensors;
- nvjpeg batched decode on the GPU (`torchvision.io.decode_jpeg(list, device='cuda')`) with
  the resize to 224 on the GPU;
- reduced-size decoding on CPU processes (libjpeg DCT scaling through PIL `draft`: a 4K JPEG
  decodes at 1/8 scale, 480×270, skipping most of the inverse DCT and colour work);
- end to end, pipelined: a GPU-decode thread and a CPU-decode pool fill one queue, shares
  split by their measured rates, while the main thread runs the model on batches; GPU
  utilisation sampled with NVML every 100 ms.

Part 2, captions: a ~1.9B LLaVA-style VLM (CLIP ViT-L/14-336 + a Qwen2-1.5B-shaped decoder),
random weights, bf16, through `VlmCaptioner` (batched `generate`, every caption forced to
`--tokens` new tokens) on 512-px thumbnails made by the job's own `decode`.

Usage (device machine): `python -m bench.model_stages_gpu --images scratch/bench4k`;
`--smoke` runs tiny models on the CPU to check the code paths.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import queue
import statistics
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

SPAWN = multiprocessing.get_context("spawn")
"""Decode processes are spawned: forking a process that holds a CUDA context is unsafe."""

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def _cpu_decode(data: bytes, side: int = 224) -> np.ndarray:
    """Reduced-size decode (DCT scaling), shortest side to `side`, centre crop: uint8 HWC."""
    import io

    from PIL import Image

    img = Image.open(io.BytesIO(data))
    img.draft("RGB", (side, side))  # the smallest DCT scale still >= side on both axes
    img = img.convert("RGB")
    w, h = img.size
    s = side / min(w, h)
    img = img.resize((max(side, round(w * s)), max(side, round(h * s))), Image.Resampling.BICUBIC)
    w, h = img.size
    left, top = (w - side) // 2, (h - side) // 2
    return np.asarray(img.crop((left, top, left + side, top + side)))


def _cpu_chunk(chunk: list[bytes]) -> bytes:
    return np.stack([_cpu_decode(d) for d in chunk]).tobytes()


class GpuUtil:
    """GPU utilisation sampled by NVML in a thread."""

    def __init__(self) -> None:
        self.samples: list[int] = []
        self._stop = threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            self._h = pynvml.nvmlDeviceGetHandleByIndex(0)
            self._nvml = pynvml
        except Exception:
            self._nvml = None

    def __enter__(self) -> GpuUtil:
        def run() -> None:
            while not self._stop.is_set() and self._nvml:
                self.samples.append(self._nvml.nvmlDeviceGetUtilizationRates(self._h).gpu)
                time.sleep(0.1)

        self._t = threading.Thread(target=run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._t.join()

    def mean(self) -> float | None:
        return round(statistics.mean(self.samples), 1) if self.samples else None


def _gpu_preprocess(imgs: list[Any], side: int = 224) -> Any:
    """Decoded uint8 CHW tensors on the GPU → normalised (B, 3, side, side) bf16."""
    import torch
    import torch.nn.functional as F

    out = []
    for x in imgs:
        _, h, w = x.shape
        s = side / min(h, w)
        nh, nw = max(side, round(h * s)), max(side, round(w * s))
        y = F.interpolate(x[None].float(), size=(nh, nw), mode="bilinear", antialias=True)
        top, left = (nh - side) // 2, (nw - side) // 2
        out.append(y[:, :, top : top + side, left : left + side])
    b = torch.cat(out).div_(255)
    mean = torch.tensor(MEAN, device=b.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=b.device).view(1, 3, 1, 1)
    return ((b - mean) / std).to(torch.bfloat16)


def _normalise_cpu(arr_BHWC: np.ndarray, device: str) -> Any:
    import torch

    x = torch.from_numpy(arr_BHWC).to(device, non_blocking=True).permute(0, 3, 1, 2).float()
    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=device).view(1, 3, 1, 1)
    return ((x / 255 - mean) / std).to(torch.bfloat16 if device == "cuda" else torch.float32)


def scoring(args: argparse.Namespace, files: list[bytes]) -> dict[str, Any]:
    import torch

    from curation.score.clip_embedder import ClipEmbedder
    from curation.score.random_models import (
        TINY_CLIP,
        build_aesthetic,
        build_open_clip,
        build_safety,
    )

    dev = "cpu" if args.smoke else "cuda"
    tmp = Path(args.tmp)
    if args.smoke:
        cfg = {
            **TINY_CLIP,
            "vision_cfg": {**TINY_CLIP["vision_cfg"], "image_size": 224, "patch_size": 32},
        }
        clip = build_open_clip(tmp, "tiny-clip-224", cfg)
        model_name, dim = clip["config"], clip["dim"]
    else:
        import open_clip

        torch.manual_seed(0)
        with torch.device("cuda"):
            m = open_clip.create_model("ViT-L-14", pretrained=None)
        clip = {"weights": str(tmp / "vitl14.pt")}
        torch.save(m.state_dict(), clip["weights"])
        del m
        model_name, dim = "ViT-L-14", 768
    emb = ClipEmbedder(
        model=model_name,
        weights=clip["weights"],
        aesthetic_weights=build_aesthetic(tmp / "aes.pt", dim),
        safety_weights=build_safety(tmp / "safety.pt", [dim, 256, 1]),
        device=dev,
    )
    t = time.perf_counter()
    emb.setup()
    res: dict[str, Any] = {"load_s": round(time.perf_counter() - t, 2)}
    bs = args.batch
    n = args.num

    def sync() -> None:
        if dev == "cuda":
            torch.cuda.synchronize()

    # 1. the model alone
    x = torch.randn(bs, 3, 224, 224, device=dev)
    for _ in range(2):
        emb.embed_pixels(x)
    sync()
    times = []
    for _ in range(3 if args.smoke else 10):
        t = time.perf_counter()
        out = emb.embed_pixels(x)
        sync()
        times.append(time.perf_counter() - t)
    res["model_only_img_s"] = round(bs / statistics.median(times), 1)
    assert set(out) >= {"embedding", "aesthetic", "nsfw"}

    # 2. CPU reduced-size decode, one process per core but one
    workers = max(1, (os.cpu_count() or 2) - 1)
    chunk = 8
    items = [files[i % len(files)] for i in range(min(n, 64 * workers if not args.smoke else 16))]
    with ProcessPoolExecutor(workers, mp_context=SPAWN) as pool:
        list(pool.map(_cpu_chunk, [items[:chunk]] * workers))  # warm the workers
        t = time.perf_counter()
        list(pool.map(_cpu_chunk, [items[i : i + chunk] for i in range(0, len(items), chunk)]))
        res["cpu_draft_decode_img_s"] = round(len(items) / (time.perf_counter() - t), 1)
    res["cpu_workers"] = workers

    # 3. GPU decode (nvjpeg, batched) + resize
    gpu_files: list[bytes] = []
    if dev == "cuda":
        from torchvision.io import decode_jpeg

        per_file: dict[str, Any] = {}
        ok = []
        for name, d in zip(args.names, files, strict=True):
            tt = torch.frombuffer(bytearray(d), dtype=torch.uint8)
            try:
                decode_jpeg([tt] * 8, device="cuda")
                sync()
                t = time.perf_counter()
                decode_jpeg([tt] * 8, device="cuda")
                sync()
                per_file[name] = round(8 / (time.perf_counter() - t), 1)
                ok.append(d)
            except Exception as e:
                per_file[name] = f"failed: {type(e).__name__}: {str(e)[:120]}"
        res["gpu_decode_img_s_by_file"] = per_file
        gpu_files[:] = ok
        tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in gpu_files]
        gb = args.decode_batch
        batch = [tensors[i % len(tensors)] for i in range(gb)]
        decode_jpeg(batch, device="cuda")
        sync()
        reps = max(2, min(8, n // gb))
        t = time.perf_counter()
        for _ in range(reps):
            decode_jpeg(batch, device="cuda")
        sync()
        res["gpu_decode_img_s"] = round(reps * gb / (time.perf_counter() - t), 1)
        t = time.perf_counter()
        for _ in range(reps):
            _gpu_preprocess(decode_jpeg(batch, device="cuda"))
        sync()
        res["gpu_decode_resize_img_s"] = round(reps * gb / (time.perf_counter() - t), 1)

    # 4. end to end, pipelined
    def e2e(gpu_share: float, cpu_on: bool) -> dict[str, Any]:
        q: queue.Queue = queue.Queue(maxsize=64)
        n_gpu = round(n * gpu_share) if dev == "cuda" and gpu_files else 0
        n_cpu = n - n_gpu if cpu_on else 0
        total = n_gpu + n_cpu
        done_scores: list[int] = []

        errors: list[BaseException] = []

        def guarded(fn: Any, *a: Any) -> Any:
            def run() -> None:
                try:
                    fn(*a)
                except BaseException as e:  # surfaced by the consumer below
                    errors.append(e)
                    q.put((None, None))

            return run

        def gpu_worker() -> None:
            from torchvision.io import decode_jpeg

            stream = torch.cuda.Stream()
            tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in gpu_files]
            with torch.cuda.stream(stream):
                for i in range(0, n_gpu, args.decode_batch):
                    idx = range(i, min(n_gpu, i + args.decode_batch))
                    px = _gpu_preprocess(
                        decode_jpeg([tensors[j % len(tensors)] for j in idx], device="cuda")
                    )
                    ev = torch.cuda.Event()
                    ev.record(stream)
                    q.put((px, ev))

        def cpu_worker(pool: ProcessPoolExecutor) -> None:
            chunks = [
                [files[(n_gpu + j) % len(files)] for j in range(i, min(n_cpu, i + chunk))]
                for i in range(0, n_cpu, chunk)
            ]
            for raw, c in zip(pool.map(_cpu_chunk, chunks), chunks, strict=True):
                arr = np.frombuffer(raw, dtype=np.uint8).reshape(len(c), 224, 224, 3)
                q.put((arr, None))

        with ProcessPoolExecutor(workers, mp_context=SPAWN) as pool, GpuUtil() as util:
            list(pool.map(_cpu_chunk, [files[:1]] * workers))
            t0 = time.perf_counter()
            threads = []
            if n_gpu:
                threads.append(threading.Thread(target=guarded(gpu_worker), daemon=True))
            if n_cpu:
                threads.append(threading.Thread(target=guarded(cpu_worker, pool), daemon=True))
            for th in threads:
                th.start()
            pending: list[Any] = []
            got = 0
            model_s = 0.0
            while got < total:
                item, ev = q.get(timeout=120)
                if item is None:
                    raise RuntimeError(f"decode worker failed: {errors[0]!r}") from errors[0]
                if ev is not None:
                    torch.cuda.current_stream().wait_event(ev)
                    pending.append(item)
                    got += item.shape[0]
                else:
                    pending.append(_normalise_cpu(item, dev))
                    got += item.shape[0]
                rows = sum(p.shape[0] for p in pending)
                if rows >= bs or got >= total:
                    tm = time.perf_counter()
                    outs = emb.embed_pixels(torch.cat(pending))
                    done_scores.append(int(outs["aesthetic"].float().isfinite().sum()))
                    sync()
                    model_s += time.perf_counter() - tm
                    pending = []
            sync()
            wall = time.perf_counter() - t0
            for th in threads:
                th.join()
        assert sum(done_scores) == total, (sum(done_scores), total)
        return {
            "images": total,
            "gpu_decoded": n_gpu,
            "cpu_decoded": n_cpu,
            "img_s": round(total / wall, 1),
            "model_busy_share": round(model_s / wall, 3),
            "gpu_util_mean_pct": util.mean(),
        }

    res["e2e"] = {}
    runs = [("cpu_decode_only", 0.0, True)]
    if gpu_files:
        g, c = res["gpu_decode_resize_img_s"], res["cpu_draft_decode_img_s"]
        runs = [("gpu_decode_only", 1.0, False), *runs, ("gpu_and_cpu_decode", g / (g + c), True)]
    for name, share, cpu_on in runs:
        try:
            res["e2e"][name] = e2e(share, cpu_on)
        except Exception as e:
            res["e2e"][name] = f"failed: {type(e).__name__}: {str(e)[:300]}"
        print(name, res["e2e"][name], flush=True)
    return res


def captioning(args: argparse.Namespace, files: list[bytes]) -> dict[str, Any]:
    import torch

    from curation.caption.captioner import VlmCaptioner
    from curation.score.random_models import build_vlm

    dev = "cpu" if args.smoke else "cuda"
    folder = Path(args.tmp) / "vlm"
    t = time.perf_counter()
    size = "tiny" if args.smoke else "2b"
    build_vlm(folder, size, dtype="float32" if args.smoke else "bfloat16", device=dev)
    res: dict[str, Any] = {"build_s": round(time.perf_counter() - t, 1), "size": size}
    cap = VlmCaptioner(
        model_path=str(folder),
        device=dev,
        max_new_tokens=args.tokens,
        min_new_tokens=args.tokens,
    )
    cap.setup()
    res["params_b"] = round(sum(p.numel() for p in cap._model.parameters()) / 1e9, 3)
    import io

    from PIL import Image

    thumbs = []
    for d in files:  # as pass 1 makes them: reduced-size decode, longest side 512
        img = Image.open(io.BytesIO(d))
        img.draft("RGB", (512, 512))
        img = img.convert("RGB")
        img.thumbnail((512, 512), Image.Resampling.BICUBIC)
        thumbs.append(img)
    res["runs"] = []
    for bs in args.caption_batches:
        imgs = [thumbs[i % len(thumbs)] for i in range(bs)]
        cap.generate(imgs[: min(bs, 4)], [cap.prompt] * min(bs, 4))  # warm-up
        if dev == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        caps, tokens = cap.generate(imgs, [cap.prompt] * bs)
        if dev == "cuda":
            torch.cuda.synchronize()
        s = time.perf_counter() - t
        res["runs"].append(
            {
                "batch": bs,
                "seconds": round(s, 2),
                "img_s": round(bs / s, 2),
                "tokens": tokens,
                "tokens_s": round(tokens / s, 1),
                "caption_chars": round(statistics.mean(len(c) for c in caps), 1),
            }
        )
        print("caption", res["runs"][-1], flush=True)
    return res


def prepare(folder: str) -> None:
    """Copy Debian's JPEG wallpapers of at least 4K pixels (one side >= 3840) into `folder`."""
    import shutil

    from PIL import Image

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    for root in ("/usr/share/wallpapers", "/usr/share/backgrounds"):
        for p in sorted(Path(root).rglob("*.jpg")):
            if p.is_symlink():
                continue
            with Image.open(p) as im:
                w, h = im.size
            if max(w, h) < 3840 or w * h > 20_000_000:
                continue
            theme = p.parts[4] if root.endswith("wallpapers") else p.stem
            name = theme + ("_dark" if "images_dark" in p.parts else "") + ".jpg"
            shutil.copy(p, out / name)
    print(f"{len(list(out.glob('*.jpg')))} JPEGs in {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", default="scratch/bench4k")
    ap.add_argument("--num", type=int, default=4096, help="images scored end to end")
    ap.add_argument("--batch", type=int, default=256, help="model batch")
    ap.add_argument("--decode-batch", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per caption")
    ap.add_argument("--caption-batches", type=int, nargs="+", default=[16, 64, 128])
    ap.add_argument("--tmp", default="/tmp/n4k-bench")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--smoke", action="store_true", help="tiny models on the CPU")
    ap.add_argument("--skip-caption", action="store_true")
    ap.add_argument("--prepare", metavar="FOLDER", help="only copy the bench JPEGs into FOLDER")
    args = ap.parse_args()
    if args.prepare:
        prepare(args.prepare)
        return
    paths = sorted(Path(args.images).glob("*.jpg"))
    files = [p.read_bytes() for p in paths]
    args.names = [p.name for p in paths]
    Path(args.tmp).mkdir(parents=True, exist_ok=True)
    if args.smoke:
        args.num, args.batch, args.caption_batches, args.tokens = 24, 8, [2], 4
    result: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "files": len(files)}
    try:
        import torch

        result["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
        result["torch"] = torch.__version__
    except Exception as e:
        result["device"] = f"unknown ({e})"
    result["cpus"] = os.cpu_count()
    t = time.perf_counter()
    result["scoring"] = scoring(args, files)
    print("scoring", json.dumps(result["scoring"]), flush=True)
    result["scoring_s"] = round(time.perf_counter() - t, 1)
    if not args.skip_caption:
        try:
            result["caption"] = captioning(args, files)
        except Exception as e:
            import traceback

            traceback.print_exc()
            result["caption"] = f"failed: {type(e).__name__}: {str(e)[:300]}"
    Path(args.out, "model_stages_gpu.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
