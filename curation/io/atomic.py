"""Atomic writes to local folders and object stores."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from typing import IO

import fsspec


def is_local(uri: str) -> bool:
    """True for plain paths and file:// URIs."""
    return "://" not in uri or uri.startswith("file://")


def join(base: str, *parts: str) -> str:
    """Join URI parts with '/' (also for s3:// prefixes)."""
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


@contextlib.contextmanager
def atomic_write(uri: str, mode: str = "wb") -> Iterator[IO]:
    """Write `uri` so that readers see the old file or the whole new one, never a part.

    Local files are written to a temporary name in the same folder, flushed to disk and
    renamed over the target. Object stores (s3://) publish an object only when its upload
    completes, so they are written directly; a failed upload leaves no object.
    """
    if is_local(uri):
        path = uri.removeprefix("file://")
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
        try:
            with open(tmp, mode) as fh:
                yield fh
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    else:
        with fsspec.open(uri, mode) as fh:
            yield fh
