"""Study (not adopted): a small CNN over textured luma patches as an upscale detector.

Issue 11's gaps (enlargements saved as lossy WebP or JPEG q75, mild factors) are evidence the
compression destroyed; this asks whether a learned detector finds what the hand-made tests
miss. Protocol, apart from the hand-made detector's so its held-out set stays unseen:

* ``--pack DIR``: 1536×1536 central luma crops (offsets on the 8-px grid) of the 41 clean
  calibration pictures and the 12 held-out photographs of `bench/calibrate_native.py`, as PNG.
* Calibration pictures are split: 33 to train, 8 (evenly spread) to set the threshold
  (validation); the held-out photographs are only judged.
* Natives per picture: as is, JPEG q75/85/95/100, WebP q75/85/90/95/100, crops by 3/5 px
  (WebP q85/q95, JPEG q90) and 4 px (JPEG q90), Lanczos ÷1.5 (WebP q85/q95, JPEG q90), bicubic
  ÷1.25 (JPEG and WebP q90). Enlargements (area downscale, then back up; six resizers): for
  training, 48 per picture at random factors 1.12–3.1 (a fifth near 4/3, 8/5, 2 ± 3 %), saved
  as PNG, JPEG or WebP at q75–100; for judging, `bench/calibrate_codecs.py`'s sweep (8 factors
  × 6 resizers, PNG/JPEG and WebP rotating, near-grid factors at q90).
* Each image gives its 32 most textured 64-px cells (origins on the 16-px grid, so every codec
  grid keeps its phase); an image's score is the mean logit. Two widths of a 4-layer CNN, 30
  epochs of AdamW with flips and transposes. Thresholds: the validation natives' maximum (and
  their 99th / 98th percentiles).

Usage: `python -m bench.native_cnn_study --pack DIR` here, then `python -m
bench.native_cnn_study --run DIR [--out OUT]` (a GPU: about 2 minutes on an H100 with 16
cores; the encoding pool uses every core). Results: docs/native-detection.md, *Known
weaknesses* (tried and not adopted).
"""

from __future__ import annotations

import argparse
import glob
import os
import time
from collections import Counter
from collections.abc import Iterator
from multiprocessing import Pool
from typing import TYPE_CHECKING

import cv2
import numpy as np
from PIL import Image

from bench.calibrate_codecs import FACTORS, METHODS, NEAR_GRID, encode, enlarged, resize
from curation.analyze import native as nat

if TYPE_CHECKING:
    from torch import nn

P = 64  # patch side (px)
K = 32  # patches per image
CROP = 1536
WIDTHS = ((8, 16, 32), (16, 32, 64))
Variant = tuple[str, float, str, int, np.ndarray]  # variant, factor, container, quality, pixels


def make_pack(out: str) -> None:
    """The central crops of the calibration and held-out pictures, as PNG files in `out`."""
    from bench.calibrate_native import clean_held_out, clean_pictures, load_gray

    os.makedirs(out, exist_ok=True)
    for tag, pictures in (("cal", clean_pictures()), ("held", clean_held_out())):
        for name, path in pictures:
            g = load_gray(path)
            h, w = g.shape
            ch, cw = min(h, CROP), min(w, CROP)
            y, x = (h - ch) // 16 * 8, (w - cw) // 16 * 8
            Image.fromarray(g[y : y + ch, x : x + cw]).save(
                f"{out}/{tag}__{name.replace('/', '_')}.png", compress_level=9)


def natives(g: np.ndarray) -> Iterator[Variant]:
    """The native variants of one picture."""
    h, w = g.shape
    yield "as is", 1.0, "png", 0, g
    for q in (75, 85, 95, 100):
        yield "as is", 1.0, "jpeg", q, g
    for q in (75, 85, 90, 95, 100):
        yield "as is", 1.0, "webp", q, g
    c35, c44 = np.ascontiguousarray(g[3:, 5:]), np.ascontiguousarray(g[4:, 4:])
    d15 = resize(g, (round(w / 1.5), round(h / 1.5)), "pil_lanczos")
    d125 = resize(g, (round(w / 1.25), round(h / 1.25)), "pil_bicubic")
    for q in (85, 95):
        yield "crop+3/5px", 1.0, "webp", q, c35
        yield "down lanczos 1.5", 1.0, "webp", q, d15
    yield "crop+3/5px", 1.0, "jpeg", 90, c35
    yield "crop+4px", 1.0, "jpeg", 90, c44
    yield "down lanczos 1.5", 1.0, "jpeg", 90, d15
    yield "down bicubic 1.25", 1.0, "jpeg", 90, d125
    yield "down bicubic 1.25", 1.0, "webp", 90, d125


def judged_enlargements(g: np.ndarray, index: int) -> Iterator[Variant]:
    """`bench/calibrate_codecs.py`'s sweep, without AVIF."""
    lossless_or_jpeg = (("png", 0), ("jpeg", 75), ("jpeg", 90), ("jpeg", 100))
    webp = (("webp", 75), ("webp", 90), ("webp", 100))
    for i, f in enumerate(FACTORS):
        for j, m in enumerate(METHODS):
            up = enlarged(g, f, m)
            for saves in (lossless_or_jpeg, webp):
                c, q = saves[(index + i + j) % len(saves)]
                yield m, f, c, q, up
    for i, f in enumerate(NEAR_GRID):
        up = enlarged(g, f, METHODS[(index + i) % len(METHODS)])
        for c in ("jpeg", "webp"):
            yield METHODS[(index + i) % len(METHODS)], f, c, 90, up


def training_enlargements(g: np.ndarray, rng: np.random.Generator, n: int = 48
                          ) -> Iterator[Variant]:
    """`n` enlargements at random factors, resizers, containers and qualities."""
    for _ in range(n):
        if rng.random() < 0.2:
            f = float(rng.choice(NEAR_GRID)) * float(rng.uniform(0.995, 1.005))
        else:
            f = float(np.exp(rng.uniform(np.log(1.12), np.log(3.1))))
        m = METHODS[rng.integers(len(METHODS))]
        c = ("png", "jpeg", "webp", "webp")[rng.integers(4)]
        yield m, f, c, int(rng.integers(75, 101)) if c != "png" else 0, enlarged(g, f, m)


def patches(img: np.ndarray, k: int = K) -> np.ndarray:
    """The `k` 64-px cells with the largest mean |horizontal difference|."""
    gh, gw = img.shape[0] // P, img.shape[1] // P
    a = img[: gh * P, : gw * P].astype(np.int16)
    d = np.abs(np.diff(a, axis=1)).astype(np.float32)
    energy = cv2.resize(d, (gw, gh), interpolation=cv2.INTER_AREA)
    ys, xs = np.unravel_index(np.argsort(energy.ravel())[::-1][:k], (gh, gw))
    return np.stack([img[y * P : (y + 1) * P, x * P : (x + 1) * P]
                     for y, x in zip(ys, xs, strict=True)])


def picture_rows(job: tuple[str, str, int]) -> list[tuple[dict, np.ndarray]]:
    """Every variant of one picture: its row (with the hand-made verdict when judged) and
    patches."""
    cv2.setNumThreads(1)
    path, role, index = job
    with Image.open(path) as im:
        g = np.asarray(im.convert("L"))
    rng = np.random.default_rng(index)
    ups = training_enlargements(g, rng) if role == "train" else judged_enlargements(g, index)
    out = []
    for label, variants in ((0, natives(g)), (1, ups)):
        for variant, f, c, q, img in variants:
            pix, codec = encode(img, c, q)
            kind = "native" if not label else (
                "near" if role != "train" and f in NEAR_GRID else "upscaled")
            row = {"label": label, "kind": kind, "variant": variant, "factor": f,
                   "container": c, "q": q, "codec": codec, "role": role,
                   "picture": os.path.basename(path)}
            if role != "train":
                row["hand"] = bool(nat.native_score(pix, codec=codec).score
                                   < nat.DEFAULT_NATIVE_THRESHOLD)
            out.append((row, patches(pix)))
    return out


def build(pack: str) -> tuple[list[dict], np.ndarray]:
    """Rows and patches of every picture in `pack`, on a process pool."""
    cal = sorted(glob.glob(f"{pack}/cal__*.png"))
    held = sorted(glob.glob(f"{pack}/held__*.png"))
    val = set(np.round(np.linspace(2, len(cal) - 3, 8)).astype(int).tolist())
    jobs = [(p, "val" if i in val else "train", i) for i, p in enumerate(cal)]
    jobs += [(p, "held", 100 + i) for i, p in enumerate(held)]
    t = time.perf_counter()
    with Pool(os.cpu_count() or 1) as pool:
        results = pool.map(picture_rows, jobs, chunksize=1)
    rows = [r for res in results for r, _ in res]
    pats = np.stack([p for res in results for _, p in res])
    print(f"{len(rows)} images in {time.perf_counter() - t:.0f} s", flush=True)
    return rows, pats


def make_net(width: tuple[int, int, int]) -> nn.Module:
    """A 5×5 filter bank, then three 3×3 layers (two of stride 2), average pool, one logit."""
    from torch import nn

    c1, c2, c3 = width
    return nn.Sequential(
        nn.Conv2d(1, c1, 5, padding=2, bias=False), nn.BatchNorm2d(c1),
        nn.Conv2d(c1, c2, 3, padding=1), nn.BatchNorm2d(c2), nn.ReLU(),
        nn.Conv2d(c2, c2, 3, stride=2, padding=1), nn.BatchNorm2d(c2), nn.ReLU(),
        nn.Conv2d(c2, c3, 3, stride=2, padding=1), nn.BatchNorm2d(c3), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c3, 1))


def train(x: np.ndarray, y: np.ndarray, width: tuple[int, int, int], epochs: int = 30
          ) -> nn.Module:
    """Class-balanced logistic loss, AdamW with a one-cycle schedule, flips and transposes."""
    import torch

    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    net = make_net(width).to(dev)
    xt, yt = torch.from_numpy(x).to(dev), torch.from_numpy(y).float().to(dev)
    bs = 512
    steps = epochs * (len(xt) // bs)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    pos = float(y.mean())
    weight = torch.tensor([0.5 / (1 - pos), 0.5 / pos], device=dev)
    net.train()
    for epoch in range(epochs):
        perm = torch.randperm(len(xt), device=dev)
        total = 0.0
        for s in range(len(xt) // bs):
            i = perm[s * bs : (s + 1) * bs]
            xb = xt[i].float().div_(255).sub_(0.5)
            for flip in (lambda t: t.flip(-1), lambda t: t.flip(-2), lambda t: t.transpose(-1, -2)):
                if torch.rand(()) < 0.5:
                    xb = flip(xb)
            yb = yt[i]
            loss = (torch.nn.functional.binary_cross_entropy_with_logits(
                net(xb.contiguous()).squeeze(1), yb, reduction="none") * weight[yb.long()]).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach())
        if epoch % 10 == 9:
            print(f"  {width}: epoch {epoch + 1}, loss {total / (len(xt) // bs):.4f}", flush=True)
    return net.eval()


def image_scores(net: nn.Module, pats: np.ndarray) -> np.ndarray:
    """Mean patch logit per image."""
    import torch

    dev = next(net.parameters()).device
    out = []
    with torch.inference_mode():
        for s in range(0, len(pats), 256):
            xb = torch.from_numpy(pats[s : s + 256]).to(dev).float().div_(255).sub_(0.5)
            b, k = xb.shape[:2]
            out.append(net(xb.reshape(b * k, 1, P, P)).reshape(b, k).mean(1).cpu().numpy())
    return np.concatenate(out)


def report(rows: list[dict], key: str, title: str) -> None:
    """False rejections by container; recall by container, factor and quality; near-grid."""
    def rate(sel: list[dict]) -> str:
        k = sum(r[key] for r in sel)
        return f"{k / len(sel):.3f} ({k}/{len(sel)})" if sel else "-"

    print(f"\n## {title}")
    nats = [r for r in rows if r["kind"] == "native"]
    for c in ("png", "jpeg", "webp"):
        print(f"natives {c}: rejected {rate([r for r in nats if r['container'] == c])}")
    print("  rejected natives by picture:", dict(Counter(r["picture"] for r in nats if r[key])))
    up = [r for r in rows if r["kind"] == "upscaled"]
    for c in ("png", "jpeg", "webp"):
        print(f"upscaled {c}: recall {rate([r for r in up if r['container'] == c])}")
    print("factor  " + " ".join(f"{f:6.3f}" for f in FACTORS))
    for c in ("jpeg", "webp"):
        cells = [np.mean([r[key] for r in up
                          if r["container"] == c and abs(r["factor"] - f) < 1e-6])
                 for f in FACTORS]
        print(f"{c:7s} " + " ".join(f"{v:6.2f}" for v in cells))
    for c in ("jpeg", "webp"):
        sel = [r for r in up if r["container"] == c]
        print(f"{c} by q: " + ", ".join(
            f"q{q} {np.mean([r[key] for r in sel if r['q'] == q]):.2f}"
            for q in sorted({r["q"] for r in sel})))
    near = [r for r in rows if r["kind"] == "near"]
    for c in ("jpeg", "webp"):
        print(f"near-grid q90 {c}: recall {rate([r for r in near if r['container'] == c])}")


def run(pack: str, out: str) -> None:
    """Build, train both widths, and print every table."""
    import torch

    rows, pats = build(pack)
    role = np.array([r["role"] for r in rows])
    y = np.array([r["label"] for r in rows])
    train_x = pats[role == "train"].reshape(-1, 1, P, P)
    train_y = np.repeat(y[role == "train"], K)
    print(f"{len(train_x)} training patches ({train_y.mean():.2f} from enlargements)", flush=True)
    judged = {"val": [r for r in rows if r["role"] == "val"],
              "held": [r for r in rows if r["role"] == "held"]}
    report(judged["val"], "hand", "validation, hand-made detector")
    report(judged["held"], "hand", "held out, hand-made detector")
    for width in WIDTHS:
        net = train(train_x, train_y, width)
        scores = image_scores(net, pats)
        val_natives = scores[(role == "val") & (y == 0)]
        for target in (0.0, 0.01, 0.02):
            thr = float(np.quantile(val_natives, 1 - target)) + (1e-3 if target == 0 else 0.0)
            for r, s in zip(rows, scores, strict=True):
                r["cnn"] = bool(s > thr)
                if "hand" in r:
                    r["either"] = r["cnn"] or r["hand"]
            print(f"\n### width {width}: threshold {thr:.3f} (validation natives' "
                  f"{1 - target:.0%} quantile)")
            report(judged["val"], "cnn", f"validation, CNN {width}")
            report(judged["held"], "cnn", f"held out, CNN {width}")
            report(judged["held"], "either", f"held out, CNN or hand-made {width}")
        torch.save(net.state_dict(), f"{out}/cnn_{'_'.join(map(str, width))}.pt")


def main() -> None:
    """``--pack DIR`` or ``--run DIR``."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pack", help="write the crops to this folder")
    ap.add_argument("--run", help="train and judge over the crops in this folder")
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="where the weights go")
    args = ap.parse_args()
    if args.pack:
        make_pack(args.pack)
    if args.run:
        run(args.run, args.out)


if __name__ == "__main__":
    main()
