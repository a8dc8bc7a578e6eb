"""List a job's inputs: local folders, URI list files, `s3://` prefixes and WebDataset tars.

Listing yields small rows (URIs, no bytes). Each image file becomes one input row, with the
URI of its sidecar caption when one exists; each tar becomes one row that the `TarReader`
expands into its members.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath

import braceexpand
import fsspec

TAR_EXTENSIONS = (".tar",)


@dataclass(frozen=True)
class InputItem:
    """One listed input: a file (maybe with a sidecar) or a tar to expand."""

    uri: str
    kind: str  # "file" | "tar"
    sidecar: str | None = None


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for a URI and the path inside it."""
    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path


def _uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol in ("file", "local"):
        return os.path.abspath(path)
    return f"{protocol}://{path}"


def _group_folder(
    fs: fsspec.AbstractFileSystem, paths: Iterable[str], sidecar_exts: tuple[str, ...]
) -> Iterator[InputItem]:
    """Pair images with sidecars; every non-sidecar file is an input."""
    paths = sorted(paths)
    by_stem: dict[str, dict[str, str]] = {}
    for p in paths:
        pp = PurePosixPath(p)
        by_stem.setdefault(str(pp.with_suffix("")), {})[pp.suffix.lower().lstrip(".")] = p
    for p in paths:
        pp = PurePosixPath(p)
        name = pp.name
        if name.startswith(".") or name == "_SUCCESS":
            continue
        ext = pp.suffix.lower().lstrip(".")
        siblings = by_stem[str(pp.with_suffix(""))]
        if ext in sidecar_exts and any(e not in sidecar_exts for e in siblings):
            continue  # a sidecar of an image with the same stem
        if ext in sidecar_exts and ext == "json":
            continue  # stray metadata, not an image
        if p.lower().endswith(TAR_EXTENSIONS):
            yield InputItem(_uri(fs, p), "tar")
            continue
        sidecar = None
        if ext not in sidecar_exts:
            for se in sidecar_exts:
                if se in siblings:
                    sidecar = _uri(fs, siblings[se])
                    break
        yield InputItem(_uri(fs, p), "file", sidecar)


def list_inputs(
    inputs: Iterable[str],
    *,
    sidecar_extensions: Iterable[str] = ("txt", "json"),
    list_extensions: Iterable[str] = ("lst", "list", "uris"),
    storage_options: dict | None = None,
) -> Iterator[InputItem]:
    """Yield every input item of the given INPUT arguments, in a deterministic order.

    Args:
        inputs: local folders, `s3://` prefixes, URI list files, tar files or brace patterns.
        sidecar_extensions: extensions of caption sidecars (not inputs themselves).
        list_extensions: a file INPUT with one of these extensions lists one URI per line.
        storage_options: fsspec options (e.g. the S3 endpoint).

    Raises:
        ValueError: an INPUT that does not exist.
    """
    sidecar_exts = tuple(e.lower() for e in sidecar_extensions)
    list_exts = tuple("." + e.lower() for e in list_extensions)
    for raw in inputs:
        for inp in braceexpand.braceexpand(raw):
            fs, path = fsspec.core.url_to_fs(inp, **(storage_options or {}))
            if fs.isdir(path):
                files = [p for p in fs.find(path) if not fs.isdir(p)]
                yield from _group_folder(fs, files, sidecar_exts)
            elif fs.exists(path):
                if path.lower().endswith(list_exts):
                    with fs.open(path, "rt") as fh:
                        uris = [ln.strip() for ln in fh if ln.strip() and not ln.startswith("#")]
                    # Listed URIs are taken as they are: one that cannot be read becomes an
                    # `unreadable` manifest row, not a failed job.
                    for uri in uris:
                        for u in braceexpand.braceexpand(uri):
                            kind = "tar" if u.lower().endswith(TAR_EXTENSIONS) else "file"
                            if "://" not in u:
                                u = os.path.abspath(u)
                            yield InputItem(u, kind)
                elif path.lower().endswith(TAR_EXTENSIONS):
                    yield InputItem(_uri(fs, path), "tar")
                else:
                    yield from _group_folder(fs, [path], sidecar_exts)
            else:
                raise ValueError(f"input {inp!r} does not exist")
