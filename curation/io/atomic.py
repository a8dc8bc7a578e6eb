"""Atomic writes to local folders and object stores."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import uuid
from collections.abc import Iterator
from typing import IO

import fsspec

WORK = "_work"
"""A job output's working folder; local temporary files are staged in `_work/tmp` under it."""

STAGING_DEPTH = 4
"""How many folders above a target are searched for the output's `_work` folder."""


def storage_errors() -> tuple[type[Exception], ...]:
    """Errors of reading or writing OUT that are the storage's, not the program's: OSError,
    and botocore's own (no credentials, an unreachable endpoint), which are not OSErrors."""
    try:
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:  # no S3 support installed
        return (OSError,)
    return (OSError, BotoCoreError, ClientError)


def is_local(uri: str) -> bool:
    """True for plain paths and file:// URIs."""
    return "://" not in uri or uri.startswith("file://")


def join(base: str, *parts: str) -> str:
    """Join URI parts with '/' (also for s3:// prefixes)."""
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def staging_folder(path: str) -> str:
    """Where a local write to `path` keeps its temporary file until it is complete.

    The `_work/tmp` folder of the nearest enclosing job output (the first of the target's
    `STAGING_DEPTH` parent folders that holds `_work/`), so that a reader of the output never
    sees a partial or temporary file outside `_work/`; elsewhere the target's own folder.
    """
    folder = os.path.dirname(os.path.abspath(path))
    probe = folder
    for _ in range(STAGING_DEPTH):
        if os.path.basename(probe) == WORK:
            return os.path.join(probe, "tmp")
        if os.path.isdir(os.path.join(probe, WORK)):
            return os.path.join(probe, WORK, "tmp")
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    return folder


def part_name(sources: list[str]) -> str:
    """`part-<digest>.parquet` for a batch's side file, the digest of its sorted sources: a
    retried batch rewrites its own file instead of adding a second one."""
    digest = hashlib.sha1("\n".join(sorted(sources)).encode()).hexdigest()[:20]
    return f"part-{digest}.parquet"


@contextlib.contextmanager
def atomic_write(uri: str, mode: str = "wb") -> Iterator[IO]:
    """Write `uri` so that readers see the old file or the whole new one, never a part.

    Local files are written to a hidden temporary name in `staging_folder(uri)` (the output's
    `_work/tmp`), flushed to disk and renamed over the target. Object stores (s3://) publish
    an object only when its upload completes; when the body raises, the upload is discarded
    (an aborted multipart upload, or no request at all), so no partial object appears.
    """
    if is_local(uri):
        path = uri.removeprefix("file://")
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        staging = staging_folder(path)
        os.makedirs(staging, exist_ok=True)
        tmp = os.path.join(staging, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:12]}")
        try:
            with open(tmp, mode) as fh:
                yield fh
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return
    fs, path = fsspec.core.url_to_fs(uri)
    raw = fs.open(path, "wb")
    fh: IO = io.TextIOWrapper(raw, encoding="utf-8") if "b" not in mode else raw
    try:
        yield fh
        fh.flush()
    except BaseException:
        if fh is not raw:
            fh.detach()  # the wrapper must not flush into the discarded upload later
        discard = getattr(raw, "discard", None)
        if callable(discard):
            discard()
        raw.closed = True  # closing would commit what was buffered so far
        raise
    fh.close()
