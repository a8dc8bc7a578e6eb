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
import faulthandler
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

T0 = time.perf_counter()


def stage(msg: str) -> None:
    """One line per step, with the seconds since start: a partial run still says where it was."""
    print(f"[{time.perf_counter() - T0:7.1f} s] {msg}", flush=True)


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


def _progressive(data: bytes) -> bool:
    """Whether a JPEG is progressive (nvjpeg decodes those on the CPU, one at a time)."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return bool(img.info.get("progressive") or img.info.get("progression"))


_PATHS: list[str] = []
"""The bench files, set in every decode process by `_worker_init`: tasks name files by index."""


def _worker_init(paths: list[str]) -> None:
    """A decode process: remember the files and keep freed memory for the next image.

    libjpeg allocates a progressive file's whole coefficient buffer per image; glibc hands
    such blocks back to the kernel on free (mmap), so every decode page-faults ~30-100 MB in
    again. With mmap off and no trimming the next image reuses the same pages.
    """
    import ctypes

    global _PATHS
    _PATHS = paths
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-4, 0)  # M_MMAP_MAX: no mmap for large blocks
        libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD: never give the heap top back
    except OSError:  # not glibc: slower, not wrong
        pass


def _read(i: int) -> bytes:
    with open(_PATHS[i], "rb") as f:
        return f.read()


def _cpu_chunk(chunk: list[int]) -> bytes:
    """Read and decode the files at these indices (reduced size): stacked uint8 HWC bytes."""
    return np.stack([_cpu_decode(_read(i)) for i in chunk]).tobytes()


def dc_scans_only(data: bytes) -> bytes | None:
    """A progressive JPEG without its AC scans, for a 1/8-scale decode (None for any other file,
    or one whose markers cannot be followed to its end).

    At 1/8 scale libjpeg's IDCT reads only each block's DC coefficient (and, for a 2x2
    subsampled file, three AC coefficients of the chroma blocks), which a progressive file
    carries in its first scan(s); dropping the AC scans skips most of the entropy decoding.
    The first AC quantiser of every table is set to 0: the AC coefficients are all 0 here
    anyway, and libjpeg then skips its block smoothing (which would invent AC coefficients
    and cost a third of the decode), so the result equals the whole file's 1/8 decode except
    for those chroma AC terms of a 2x2 subsampled file (0.5 levels on average in the bench
    files). The job's thumbnails keep the chroma AC scans and are exact
    (`curation.analyze.jpeg_scans.without_luma_ac`).
    """
    from curation.analyze import jpeg_scans

    if data[:2] != b"\xff\xd8":
        return None
    try:
        parts = list(jpeg_scans.segments(data))
        frames = [m for m, _, _ in parts
                  if m == jpeg_scans.PROGRESSIVE_HUFFMAN or m in jpeg_scans.OTHER_FRAMES]
        if frames != [jpeg_scans.PROGRESSIVE_HUFFMAN]:
            return None
        out = [data[:2]]
        for marker, start, end in parts:
            chunk = data[start:end]
            if marker == jpeg_scans.SOS and data[start + 5 + 2 * data[start + 4]] != 0:
                continue  # an AC scan (spectral start > 0)
            if marker == jpeg_scans.DQT:
                chunk = jpeg_scans.zero_first_ac(chunk)[0]
            out.append(chunk)
    except (ValueError, IndexError):
        return None
    return b"".join([*out, b"\xff\xd9"])


def _dc_eligible(data: bytes, side: int = 224) -> bool:
    """Whether the reduced decode runs at 1/8 scale, where only DC coefficients are read."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return min(img.size) >= 8 * side


def _cpu_chunk_dc(chunk: list[int]) -> bytes:
    """`_cpu_chunk`, with progressive files decoded from their DC scans alone at 1/8 scale."""
    out = []
    for i in chunk:
        d = _read(i)
        out.append(_cpu_decode((_dc_eligible(d) and dc_scans_only(d)) or d))
    return np.stack(out).tobytes()


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
    stage("model built; loading it as the job does")
    t = time.perf_counter()
    emb.setup()
    res: dict[str, Any] = {"load_s": round(time.perf_counter() - t, 2)}
    stage(f"loaded in {res['load_s']} s")
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
    stage(f"model alone: {res['model_only_img_s']} images/s")
    assert set(out) >= {"embedding", "aesthetic", "nsfw"}

    # 2. CPU reduced-size decode, one process per core but one; baseline and progressive apart
    workers = max(1, (os.cpu_count() or 2) - 1)
    chunk = 8
    prog = [_progressive(d) for d in files]
    every = list(range(len(files)))  # the decode processes read files by index
    base_files = [i for i in every if not prog[i]]
    prog_files = [i for i in every if prog[i]]
    res["files_baseline"], res["files_progressive"] = len(base_files), len(prog_files)
    pool_args = {"mp_context": SPAWN, "initializer": _worker_init, "initargs": (args.paths,)}
    m = 16 if args.smoke else min(n, 48 * workers)
    with ProcessPoolExecutor(workers, **pool_args) as pool:
        list(pool.map(_cpu_chunk, [[0]] * workers))  # start and warm the workers
        for label, group in (("all", every), ("baseline", base_files), ("progressive", prog_files)):
            if not group:
                continue
            items = [group[i % len(group)] for i in range(m)]
            t = time.perf_counter()
            list(pool.map(_cpu_chunk, [items[i : i + chunk] for i in range(0, m, chunk)]))
            res[f"cpu_draft_decode_img_s_{label}"] = round(m / (time.perf_counter() - t), 1)
        items = [prog_files[i % len(prog_files)] for i in range(m)] if prog_files else []
        if items:
            t = time.perf_counter()
            list(pool.map(_cpu_chunk_dc, [items[i : i + chunk] for i in range(0, m, chunk)]))
            res["cpu_draft_decode_img_s_progressive_dc"] = round(m / (time.perf_counter() - t), 1)
    res["cpu_workers"] = workers
    stage(
        f"CPU reduced-size decode, {workers} processes: "
        + ", ".join(f"{k[23:]} {v}" for k, v in res.items() if k.startswith("cpu_draft"))
    )

    # 3. GPU decode (nvjpeg, batched) + resize, per file, then batches of the baseline files
    gpu_files: list[int] = []
    if dev == "cuda":
        from torchvision.io import decode_jpeg

        per_file: dict[str, Any] = {}
        for k, (name, d, p) in enumerate(zip(args.names, files, prog, strict=True)):
            tt = torch.frombuffer(bytearray(d), dtype=torch.uint8)
            try:
                decode_jpeg([tt] * 4, device="cuda")
                sync()
                t = time.perf_counter()
                decode_jpeg([tt] * 4, device="cuda")
                sync()
                per_file[name] = round(4 / (time.perf_counter() - t), 1)
                if not p:
                    gpu_files.append(k)
            except Exception as e:
                per_file[name] = f"failed: {type(e).__name__}: {str(e)[:120]}"
            stage(f"nvjpeg {name} ({'progressive' if p else 'baseline'}): {per_file[name]}")
        res["gpu_decode_img_s_by_file"] = per_file
    if gpu_files:
        tensors = [torch.frombuffer(bytearray(files[i]), dtype=torch.uint8) for i in gpu_files]
        gb = args.decode_batch
        batch = [tensors[i % len(tensors)] for i in range(gb)]
        decode_jpeg(batch, device="cuda")
        sync()
        reps = max(2, min(8, n // gb))
        t = time.perf_counter()
        for _ in range(reps):
            decode_jpeg(batch, device="cuda")
        sync()
        res["gpu_decode_img_s_baseline"] = round(reps * gb / (time.perf_counter() - t), 1)
        t = time.perf_counter()
        for _ in range(reps):
            _gpu_preprocess(decode_jpeg(batch, device="cuda"))
        sync()
        res["gpu_decode_resize_img_s_baseline"] = round(reps * gb / (time.perf_counter() - t), 1)
        stage(
            f"nvjpeg, batches of {gb} baseline files: {res['gpu_decode_img_s_baseline']} images/s,"
            f" with resize {res['gpu_decode_resize_img_s_baseline']}"
        )

    # 4. end to end, pipelined: a GPU-decode thread and a CPU pool fill one queue
    def e2e(gpu_items: list[int], cpu_items: list[int], dc: bool = False) -> dict[str, Any]:
        q: queue.Queue = queue.Queue(maxsize=64)
        n_gpu, n_cpu = len(gpu_items), len(cpu_items)
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
            u8 = torch.uint8
            one = {i: torch.frombuffer(bytearray(files[i]), dtype=u8) for i in {*gpu_items}}
            tensors = [one[i] for i in gpu_items]
            with torch.cuda.stream(stream):
                for i in range(0, n_gpu, args.decode_batch):
                    px = _gpu_preprocess(
                        decode_jpeg(tensors[i : i + args.decode_batch], device="cuda")
                    )
                    ev = torch.cuda.Event()
                    ev.record(stream)
                    q.put((px, ev))

        def cpu_worker(pool: ProcessPoolExecutor) -> None:
            chunks = [cpu_items[i : i + chunk] for i in range(0, n_cpu, chunk)]
            fn = _cpu_chunk_dc if dc else _cpu_chunk
            for raw, c in zip(pool.map(fn, chunks), chunks, strict=True):
                arr = np.frombuffer(raw, dtype=np.uint8).reshape(len(c), 224, 224, 3)
                q.put((arr, None))

        with ProcessPoolExecutor(workers, **pool_args) as pool, GpuUtil() as util:
            list(pool.map(_cpu_chunk, [[0]] * workers))
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

    def split(group: list[int], gpu_share: float) -> tuple[list[int], list[int]]:
        items = [group[i % len(group)] for i in range(n)]
        k = round(n * gpu_share)
        return items[:k], items[k:]

    runs: dict[str, tuple[list[int], list[int]]] = {"all_cpu_only": split(every, 0.0)}
    runs["all_cpu_only_dc"] = runs["all_cpu_only"]
    if gpu_files:
        g = res["gpu_decode_resize_img_s_baseline"]
        c = res.get("cpu_draft_decode_img_s_baseline", 0.0)
        items = [i % len(files) for i in range(n)]
        routed_gpu = [i for i in items if not prog[i]]
        routed_cpu = [i for i in items if prog[i]]
        runs["all_routed"] = (routed_gpu, routed_cpu)  # baseline on the GPU, progressive on CPUs
        runs["all_routed_dc"] = runs["all_routed"]
        runs["baseline_gpu_only"] = split(base_files, 1.0)
        runs["baseline_gpu_and_cpu"] = split(base_files, g / (g + c))
    res["e2e"] = {}
    for name, (gi, ci) in runs.items():
        if args.e2e and name not in args.e2e:
            continue
        stage(f"end to end: {name} ({len(gi)} on the GPU, {len(ci)} on CPUs)")
        try:
            res["e2e"][name] = e2e(gi, ci, dc=name.endswith("_dc"))
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
        stage(f"captions at batch {bs} generated")
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
    ap.add_argument("--caption-batches", type=int, nargs="+", default=[16, 64, 128, 256])
    ap.add_argument("--tmp", default="/tmp/n4k-bench")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--smoke", action="store_true", help="tiny models on the CPU")
    ap.add_argument("--skip-caption", action="store_true")
    ap.add_argument("--skip-scoring", action="store_true")
    ap.add_argument(
        "--e2e",
        nargs="+",
        metavar="RUN",
        help="only these end-to-end runs (all_cpu_only, all_cpu_only_dc, all_routed, "
        "all_routed_dc, baseline_gpu_only, baseline_gpu_and_cpu)",
    )
    ap.add_argument(
        "--watchdog", type=float, default=0, help="print every thread's stack each N s (hangs)"
    )
    ap.add_argument("--prepare", metavar="FOLDER", help="only copy the bench JPEGs into FOLDER")
    args = ap.parse_args()
    if args.watchdog:
        faulthandler.dump_traceback_later(args.watchdog, repeat=True)
    if args.prepare:
        prepare(args.prepare)
        return
    paths = sorted(Path(args.images).glob("*.jpg"))
    files = [p.read_bytes() for p in paths]
    args.names = [p.name for p in paths]
    args.paths = [str(p) for p in paths]
    Path(args.tmp).mkdir(parents=True, exist_ok=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
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
    name = "model_stages_gpu" + ("_caption" if args.skip_scoring else "")
    if not args.skip_scoring:
        t = time.perf_counter()
        result["scoring"] = scoring(args, files)
        print("scoring", json.dumps(result["scoring"]), flush=True)
        result["scoring_s"] = round(time.perf_counter() - t, 1)
        Path(args.out, f"{name}.json").write_text(json.dumps(result, indent=1))
    if not args.skip_caption:
        try:
            result["caption"] = captioning(args, files)
        except Exception as e:
            import traceback

            traceback.print_exc()
            result["caption"] = f"failed: {type(e).__name__}: {str(e)[:300]}"
    Path(args.out, f"{name}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
