"""Frozen text conditioning: the CLIP-L + T5 encoders from local weights, and an offline cache.

:class:`TextEncoders` runs the two encoders exactly as :class:`model.pipeline.UltraFluxPipeline`
does at inference (CLIP padded to its 77 tokens → pooled vector; T5 padded to
``max_sequence_length`` → sequence), so training sees what sampling will feed.

``native4k encode-text DATA --encoders FOLDER --output CACHE`` (:func:`write_text_cache`)
encodes the caption of every kept sample of a curation output once and writes:

- ``embeds-00000.safetensors`` …: ``seq`` (N, L, D) and ``pooled`` (N, P) in bf16, rows in the
  order of ``index.parquet``;
- ``index.parquet``: ``key``, ``file``, ``row``;
- ``empty.safetensors``: the embeddings of the empty caption (caption dropout, missing captions);
- ``meta.json``: sequence length, widths, language, encoder folder; written last.

:class:`TextEmbeddingCache` reads it back by sample key (memory-mapped safetensors; nothing is
unpickled). The padded T5 sequence is stored whole (Flux attends to the padding too): about
4 MiB per caption at 512 tokens × 4096 in bf16.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from training.folders import replace_folder, staging_folder

ENCODER_PARTS = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")


class TextEncoders:
    """CLIP (pooled) and T5 (sequence) text encoders, frozen, from a local folder.

    Args:
        folder: Holds ``text_encoder/`` (CLIPTextModel), ``tokenizer/``, ``text_encoder_2/``
            (T5EncoderModel) and ``tokenizer_2/`` in transformers layout (FLUX.1-dev's layout).
        device: Where they run.
        dtype: Their dtype (bf16 on a GPU, fp32 on the CPU is usual).

    Raises:
        FileNotFoundError: A part is missing (the message names it).
    """

    def __init__(self, folder: str | Path, *, device: torch.device, dtype: torch.dtype) -> None:
        from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

        root = Path(folder)
        for part in ENCODER_PARTS:
            if not (root / part).is_dir():
                raise FileNotFoundError(
                    f"{root / part} not found: the text encoder folder needs "
                    f"{', '.join(ENCODER_PARTS)} (copy them from a FLUX.1-dev checkpoint)"
                )
        self.clip = CLIPTextModel.from_pretrained(root / "text_encoder", torch_dtype=dtype)
        self.t5 = T5EncoderModel.from_pretrained(root / "text_encoder_2", torch_dtype=dtype)
        self.clip.to(device).eval().requires_grad_(False)
        self.t5.to(device).eval().requires_grad_(False)
        self.clip_tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
        self.t5_tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer_2")
        self.device = device

    @property
    def seq_dim(self) -> int:
        """Width of the T5 sequence embedding."""
        return self.t5.config.d_model

    @property
    def pooled_dim(self) -> int:
        """Width of the pooled CLIP embedding."""
        return self.clip.config.hidden_size

    @torch.no_grad()
    def encode(
        self, captions: Sequence[str], max_sequence_length: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L, D) T5 sequence and (B, P) pooled CLIP embeddings of ``captions``."""
        captions = list(captions)
        clip_max = getattr(self.clip_tokenizer, "model_max_length", 77)
        clip_max = clip_max if clip_max and clip_max < 10_000 else 77
        clip_ids = self.clip_tokenizer(
            captions, padding="max_length", max_length=clip_max, truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)  # fmt: skip
        pooled = self.clip(clip_ids, output_hidden_states=False).pooler_output
        t5_ids = self.t5_tokenizer(
            captions, padding="max_length", max_length=max_sequence_length, truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)  # fmt: skip
        seq = self.t5(t5_ids, output_hidden_states=False)[0]
        return seq, pooled


def read_captions(data_root: str, language: str = "en") -> tuple[list[str], list[str]]:
    """Keys and captions (``""`` where missing) of every kept sample of a curation output."""
    import fsspec
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    column = f"caption_{language}"
    fs, path = fsspec.core.url_to_fs(data_root)
    manifest = f"{path.rstrip('/')}/manifest"
    if not fs.exists(manifest):
        raise FileNotFoundError(f"{data_root}/manifest not found: is this a curation output?")
    if not fs.exists(f"{path.rstrip('/')}/_SUCCESS"):
        raise FileNotFoundError(
            f"{data_root}/_SUCCESS not found: the curation job has not finished (rerun it)"
        )
    dataset = ds.dataset(manifest, filesystem=fs, format="parquet")
    if column not in dataset.schema.names:
        raise ValueError(f"the manifest of {data_root} has no {column} column")
    table = dataset.to_table(columns=["key", column], filter=pc.field("status") == "kept")
    keys = table.column("key").to_pylist()
    captions = [c or "" for c in table.column(column).to_pylist()]
    order = sorted(range(len(keys)), key=keys.__getitem__)
    return [keys[i] for i in order], [captions[i] for i in order]


def save_tensors(
    tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> None:
    """`safetensors.torch.save_file`, leaving the file readable as the umask says (safetensors
    writes it owner-only: 0600 would hide a shared cache or model from the other users)."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def caption_digest(caption: str) -> str:
    """The SHA-256 of a caption's text: what a cache row was encoded from."""
    return hashlib.sha256(caption.encode("utf-8")).hexdigest()


def write_text_cache(
    data_root: str,
    encoders: TextEncoders,
    output: str | Path,
    *,
    max_sequence_length: int = 512,
    language: str = "en",
    batch_size: int = 8,
    rows_per_file: int = 1024,
    encoders_folder: str = "",
    progress: bool = True,
) -> dict[str, Any]:
    """Encode every kept sample's caption into a cache folder; return its `meta.json` data
    (`num_samples`, `captioned`: how many had a caption, ...).

    The cache is written into a staging folder beside `output` and replaces it only when
    complete: an interrupted rerun leaves the earlier cache as it was.

    Raises:
        FileNotFoundError: `data_root` is not a finished curation output.
        ValueError: it kept no image (no caption to encode), or `output` is a folder that
            holds files other than a text cache (they would be replaced).
    """
    keys, captions = read_captions(data_root, language)
    if not keys:
        raise ValueError(f"{data_root} kept no image: there is no caption to encode")
    target = Path(output)
    if target.exists() and not target.is_dir():
        raise ValueError(f"{target} is a file: name a folder for the text cache")
    if target.is_dir() and not _is_cache_or_empty(target):
        raise ValueError(
            f"{target} holds files that are not a text cache: name a new or empty folder"
        )
    out = staging_folder(target)
    try:
        meta = _encode_into(out, keys, captions, encoders, max_sequence_length=max_sequence_length,
                             language=language, batch_size=batch_size, rows_per_file=rows_per_file,
                             data_root=data_root, encoders_folder=encoders_folder,
                             progress=progress)  # fmt: skip
        replace_folder(out, target)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return meta


_CACHE_FILE = re.compile(r"(meta\.json|index\.parquet|empty\.safetensors|embeds-\d+\.safetensors)")


def _is_cache_or_empty(folder: Path) -> bool:
    """Whether `folder` holds nothing but a text cache's files."""
    return all(_CACHE_FILE.fullmatch(p.name) for p in folder.iterdir())


def _encode_into(
    out: Path,
    keys: list[str],
    captions: list[str],
    encoders: TextEncoders,
    *,
    max_sequence_length: int,
    language: str,
    batch_size: int,
    rows_per_file: int,
    data_root: str,
    encoders_folder: str,
    progress: bool,
) -> dict[str, Any]:
    """Write the cache's files into `out`; its `meta.json` data."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def encode(batch: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        seq, pooled = encoders.encode(batch, max_sequence_length)
        return seq.to(torch.bfloat16).cpu(), pooled.to(torch.bfloat16).cpu()

    seq, pooled = encode([""])
    empty = {"seq": seq.contiguous(), "pooled": pooled.contiguous()}
    save_tensors(empty, out / "empty.safetensors")
    files, rows = [], []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(keys), desc="encode-text")
    for f_idx, start in enumerate(range(0, len(keys), rows_per_file)):
        chunk = captions[start : start + rows_per_file]
        seqs, pools = [], []
        for b in range(0, len(chunk), batch_size):
            s, p = encode(chunk[b : b + batch_size])
            seqs.append(s)
            pools.append(p)
            if bar is not None:
                bar.update(len(chunk[b : b + batch_size]))
        name = f"embeds-{f_idx:05d}.safetensors"
        save_tensors(
            {"seq": torch.cat(seqs).contiguous(), "pooled": torch.cat(pools).contiguous()},
            out / name,
        )
        files.extend([name] * len(chunk))
        rows.extend(range(len(chunk)))
    if bar is not None:
        bar.close()
    digests = [caption_digest(c) for c in captions]
    pq.write_table(
        pa.table({"key": keys, "file": files, "row": rows, "caption_sha256": digests}),
        out / "index.parquet",
    )
    meta = {
        "num_samples": len(keys),
        "max_sequence_length": max_sequence_length,
        "seq_dim": int(seq.shape[-1]),
        "pooled_dim": int(pooled.shape[-1]),
        "language": language,
        "data": str(data_root) if "://" in str(data_root) else os.path.abspath(data_root),
        "encoders": os.path.abspath(encoders_folder) if encoders_folder else "",
        "captioned": sum(bool(c) for c in captions),
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    return meta


class TextEmbeddingCache:
    """Reads a cache written by :func:`write_text_cache`.

    Raises:
        FileNotFoundError: ``folder`` holds no complete cache.
    """

    def __init__(self, folder: str | Path) -> None:
        import pyarrow.parquet as pq
        from safetensors import safe_open

        self.root = Path(folder)
        meta = self.root / "meta.json"
        if not meta.is_file():
            raise FileNotFoundError(
                f"{meta} not found: write the cache first with `native4k encode-text DATA "
                f"--encoders FOLDER --output {self.root}`"
            )
        self.meta: dict[str, Any] = json.loads(meta.read_text())
        index = pq.read_table(self.root / "index.parquet").to_pydict()
        self._where = {
            k: (f, r) for k, f, r in zip(index["key"], index["file"], index["row"], strict=True)
        }
        # what each row was encoded from (caches written before digests: none, not checked)
        self.digests: dict[str, str] = dict(
            zip(index["key"], index.get("caption_sha256") or (), strict=False)
        )
        self._files: dict[str, Any] = {}
        self._open = lambda name: safe_open(str(self.root / name), framework="pt")
        empty = self._open("empty.safetensors")
        self.empty_seq, self.empty_pooled = empty.get_tensor("seq"), empty.get_tensor("pooled")

    def __contains__(self, key: str) -> bool:
        return key in self._where

    @property
    def language(self) -> str:
        """The caption language encoded (``caption_<language>``)."""
        return str(self.meta.get("language", "en"))

    @property
    def max_sequence_length(self) -> int:
        """T5 tokens per caption."""
        return int(self.meta["max_sequence_length"])

    def lookup(
        self, keys: Sequence[str], *, drop: Sequence[bool] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L, D) and (B, P) bf16 embeddings of samples by key (the empty caption where
        ``drop`` is true).

        Raises:
            KeyError: A key is not in the cache (it was written for other data).
        """
        seqs, pools = [], []
        for i, key in enumerate(keys):
            if drop is not None and drop[i]:
                seqs.append(self.empty_seq[0])
                pools.append(self.empty_pooled[0])
                continue
            if key not in self._where:
                raise KeyError(
                    f"sample {key!r} is not in the text cache {self.root} (written for "
                    f"{self.meta.get('data')}): rerun native4k encode-text on this data"
                )
            name, row = self._where[key]
            if name not in self._files:
                self._files[name] = self._open(name)
            f = self._files[name]
            seqs.append(f.get_slice("seq")[row : row + 1][0])
            pools.append(f.get_slice("pooled")[row : row + 1][0])
        return torch.stack(seqs), torch.stack(pools)
