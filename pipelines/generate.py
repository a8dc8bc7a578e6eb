"""``native4k generate``: sample one image from a local UltraFlux model folder.

Example::

    native4k generate --model /models/ultraflux --prompt "a fjord at dawn" \\
        --size 5440x3072 --steps 50 --out fjord.png

The folder is in diffusers layout (``transformer/``, ``vae/``, ``scheduler/`` and the text
encoders, see :mod:`model.pipeline`); nothing is downloaded. torch and diffusers are imported
only when the command runs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from model import ROPE_METHODS
from pipelines.arguments import at_least, finite_float, positive_float, seed

_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def parse_size(text: str) -> tuple[int, int]:
    """``"WIDTHxHEIGHT"`` → ``(width, height)``; both positive multiples of 32 px."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 5440x3072, got {text!r}") from None
    if width <= 0 or height <= 0 or width % 32 or height % 32:
        raise argparse.ArgumentTypeError(
            f"width and height must be positive multiples of 32 px (one token), got {text!r}"
        )
    return width, height


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``generate`` options to ``parser``."""
    parser.add_argument("--model", required=True, type=Path, help="local model folder")
    parser.add_argument("--prompt", help="text prompt (needs the text encoders in the folder)")
    parser.add_argument(
        "--prompt-embeds",
        type=Path,
        help="torch file with 'prompt_embeds' (1, L, D) and 'pooled_prompt_embeds' (1, P), D and "
        "P the transformer's joint_attention_dim and pooled_projection_dim (FLUX: 4096, 768), "
        "instead of --prompt",
    )
    parser.add_argument(
        "--size",
        type=parse_size,
        default=(4096, 4096),
        help="WIDTHxHEIGHT in px (default 4096x4096)",
    )
    parser.add_argument("--steps", type=at_least(1), default=50, help="sampling steps (default 50)")
    parser.add_argument(
        "--guidance", type=finite_float, default=4.0, help="embedded guidance (default 4)"
    )
    parser.add_argument("--seed", type=seed, default=0, help="noise seed (default 0)")
    parser.add_argument(
        "--out", required=True, type=Path,
        help="output image file (.png, .jpg, .webp, ...; replaced if it exists, atomically)",
    )
    parser.add_argument(
        "--shift", type=positive_float,
        help="fixed timestep shift (default: the model folder's scheduler settings; Flux's and a "
        "DiT trained with the resolution shift: resolution-dependent)",
    )
    parser.add_argument(
        "--max-sequence-length", type=at_least(1), default=512, help="T5 tokens (default 512)"
    )
    parser.add_argument(
        "--rope-method", choices=ROPE_METHODS, help="override the model's RoPE method"
    )
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16")
    parser.add_argument("--device", help="torch device (default: cuda if present, else cpu)")
    parser.add_argument(
        "--fp8", action="store_true", help="e4m3 linear layers in the blocks (Hopper GPUs)"
    )
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the transformer blocks"
    )
    parser.add_argument(
        "--tiled-decode",
        choices=("auto", "on", "off"),
        default="auto",
        help="partitioned VAE decode (auto: above 2048² px)",
    )


def run(args: argparse.Namespace) -> int:
    """Generate one image as ``args`` say; return the exit status (0 ok, 1 load, 2 usage)."""
    if (args.prompt is None) == (args.prompt_embeds is None):
        print("native4k: give exactly one of --prompt and --prompt-embeds", file=sys.stderr)
        return 2
    problem = _output_problem(args.out)
    if problem:  # found before the models load, not after the sampling
        print(f"native4k: --out {args.out}: {problem}", file=sys.stderr)
        return 2
    import torch

    from model.fp8 import convert_linears_to_fp8
    from model.pipeline import UltraFluxPipeline

    dtype = getattr(torch, _DTYPES[args.dtype])
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as err:
        print(f"native4k: --device {args.device}: {err}", file=sys.stderr)
        return 2
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"native4k: --device {args.device}: no CUDA device here", file=sys.stderr)
        return 2
    try:  # before the model loads: `cuda:7` on a 2-GPU host, or a backend this build lacks
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError, ImportError) as err:
        reason = (str(err).splitlines() or [type(err).__name__])[0].split(". ")[0]
        print(f"native4k: --device {args.device}: {reason}", file=sys.stderr)
        return 2
    width, height = args.size
    problem = _shift_problem(args.model, width, height, args.shift)
    if problem:  # before the models load
        print(f"native4k: {problem}", file=sys.stderr)
        return 2
    embeds = {}
    try:
        if args.prompt_embeds is not None:
            embeds = _load_prompt_embeds(args.prompt_embeds)
        pipe = UltraFluxPipeline.from_folder(
            args.model,
            torch_dtype=dtype,
            rope_method=args.rope_method,
            load_text_encoders=args.prompt is not None,
        )
        _check_prompt_embeds(embeds, pipe.transformer.config, args.prompt_embeds)
        pipe.to(device)
    except (OSError, KeyError, ValueError, RuntimeError) as err:  # a file the model can't use
        print(f"native4k: {err}", file=sys.stderr)
        return 1
    if args.fp8:
        convert_linears_to_fp8(pipe.transformer, out_dtype=dtype)  # the blocks keep --dtype
    if args.compile:
        pipe.transformer.compile_repeated_blocks()
    tiled = {"auto": None, "on": True, "off": False}[args.tiled_decode]
    start = time.perf_counter()
    try:
        images = pipe(
            args.prompt,
            height=height,
            width=width,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            generator=torch.Generator("cpu").manual_seed(args.seed),
            max_sequence_length=args.max_sequence_length,
            shift=args.shift,
            tiled_decode=tiled,
            **embeds,
        )
    except ValueError as err:
        print(f"native4k: {err}", file=sys.stderr)
        return 2
    _save(images[0], args.out)
    print(f"{args.out}: {width}x{height}, {args.steps} steps, {time.perf_counter() - start:.1f} s")
    return 0


def _shift_problem(folder: Path, width: int, height: int, shift: float | None) -> str | None:
    """Why the model folder's resolution shift cannot sample `width`×`height` (None: it can,
    a fixed `shift` is given, or the scheduler is unread here and judged when it loads)."""
    import json

    from model.pipeline import check_resolution_shift

    try:
        config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    except (OSError, ValueError):
        return None
    if shift is not None or not isinstance(config, dict) or not config.get(
            "use_dynamic_shifting"):
        return None
    try:
        check_resolution_shift((width // 32) * (height // 32), config, f"{width}x{height}")
    except ValueError as err:
        return str(err)
    except (TypeError, ZeroDivisionError):  # settings the scheduler itself will refuse
        return None
    return None


def _image_format(path: Path) -> str | None:
    """PIL's format name for the file's extension (None: PIL writes no such file)."""
    from PIL import Image

    Image.init()
    fmt = Image.registered_extensions().get(path.suffix.lower())
    return fmt if fmt in Image.SAVE else None


def _output_problem(path: Path) -> str | None:
    """Why the image could not be written to `path` (None: it can)."""
    if path.is_dir():
        return "is a folder; name an image file"
    if _image_format(path) is None:
        return f"{path.suffix or 'no extension'} is not an image format (use .png, .jpg, .webp)"
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return f"{parent} is a file, so no folder can be made there"
    if not os.access(parent, os.W_OK):
        return f"{parent} is not writable"
    return None


def _save(image: object, path: Path) -> None:
    """Write the image to a temporary file beside `path`, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        image.save(tmp, format=_image_format(path))  # type: ignore[attr-defined]
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _load_prompt_embeds(path: Path) -> dict:
    """Read ``prompt_embeds`` and ``pooled_prompt_embeds`` from a torch file."""
    import torch

    if not path.is_file():
        raise FileNotFoundError(f"prompt embeddings file {path} not found")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises many kinds for a file that is not its own
        raise ValueError(f"{path} is not a torch file of tensors ({type(err).__name__})") from err
    names = ("prompt_embeds", "pooled_prompt_embeds")
    if not isinstance(data, dict) or not all(isinstance(data.get(n), torch.Tensor) for n in names):
        raise ValueError(f"{path} must hold a dict with tensors {names[0]} and {names[1]}")
    return {n: data[n] for n in names}


def _check_prompt_embeds(embeds: dict, config: object, path: Path | None) -> None:
    """Raise when the embeddings' shapes do not fit the transformer."""
    if not embeds:
        return
    seq, pooled = embeds["prompt_embeds"], embeds["pooled_prompt_embeds"]
    width = config.joint_attention_dim  # type: ignore[attr-defined]
    pooled_width = config.pooled_projection_dim  # type: ignore[attr-defined]
    if seq.ndim != 3 or seq.shape[0] != 1 or seq.shape[-1] != width:
        raise ValueError(f"{path}: prompt_embeds is {tuple(seq.shape)}, expected (1, L, {width})")
    if pooled.ndim != 2 or pooled.shape != (1, pooled_width):
        raise ValueError(
            f"{path}: pooled_prompt_embeds is {tuple(pooled.shape)}, expected (1, {pooled_width})"
        )
