"""Readers: bytes, digests and sidecar captions of listed inputs.

`FileReader` reads one file per row; `TarReader` expands WebDataset tars into one row per
sample. Both keep going on bad input: a file that cannot be read becomes a rejected row
(`unreadable`, or `too_large` when it exceeds the byte cap), never a crash. A rerun of the
job into the same output reads an `unreadable` input again (not one that is no regular file,
`NOT_REGULAR`), a tar from the members it could not read.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import stat
import tarfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import pyarrow as pa
from fsspec.implementations.local import LocalFileSystem
from PIL import Image

from curation import schema
from curation.base import Stage, column, record_time, set_columns, to_table
from curation.io.atomic import atomic_write, join, part_name
from curation.io.listing import escape_name, filesystem, local_path, split_tar_source

SIDECAR = "sidecar"  # listing column: URI of a sidecar caption file
META = "meta"  # listing column: URI of a `<stem>.json` metadata sidecar
SIDECAR_ZH = "sidecar_zh"  # listing column: URI of a `<stem>.zh.txt` Chinese caption
DONE_MEMBERS = "done_members"  # optional tar column: member sources already analysed (resume)
KIND = "kind"  # listing column: "file" | "tar"

CAPTION_EXTS = ("txt",)
CAPTION_ZH_EXTS = ("zh.txt",)
META_EXTS = ("json",)
LABEL_EXTS = ("cls", "cls2", "index", "id", "pyd", "pickle", "pth", "npy", "npz", "mp", "msgpack",
              "ten")  # fmt: skip
"""WebDataset members that are a sample's labels or arrays, not images: not analysed."""
META_MAX_BYTES = 64 * 1024
"""Largest metadata JSON kept verbatim in `source_meta` (img2dataset's are under 2 KB)."""
SIDECAR_MAX_BYTES = 16 * 1024 * 1024
"""Largest caption or metadata sidecar file read; a larger one is no caption (a caption is
kilobytes; a dump of gigabytes beside an image would take a worker's memory)."""


NOT_REGULAR = "not a regular file"
"""How `open_input`'s refusal of a folder, a named pipe or a device begins: what such an
input is, not a read that failed (a rerun does not read it again)."""

_SPECIAL_FILES = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a named pipe"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def open_input(uri: str) -> Any:
    """An input's (or sidecar's, or tar's) bytes as a binary file object; a local path is
    opened as it is named (`filesystem`).

    Raises:
        OSError: a local path (through its links) that is no regular file: a named pipe or a
            device is never read (a pipe without a writer blocks for ever, `/dev/zero` never
            ends).
    """
    fs, path = filesystem(local_path(uri))
    if not isinstance(fs, LocalFileSystem):
        fh = fs.open(path, "rb")
        if getattr(fh, "details", {}).get("type") == "directory":
            # A listing's cache knew this key (`a.jpg`) only as the prefix of another
            # (`a.jpg/b.jpg`) and opened 0 bytes: ask the store for the object itself.
            fh.close()
            fs.invalidate_cache(path)
            fh = fs.open(path, "rb")
        return fh
    # Non-blocking, so that opening a pipe returns at once; its type is read from the open
    # file, so the path cannot be swapped between the check and the read.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            what = next((w for test, w in _SPECIAL_FILES if test(mode)), "a special file")
            raise OSError(f"{NOT_REGULAR} but {what}")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


def read_bytes(source: str, tar_offset: int | None = None, size: int | None = None) -> bytes:
    """Read an input's bytes again: a whole file, or `size` bytes of a tar member.

    Args:
        source: the manifest's `source` (for tar members, `tar-uri#member`).
        tar_offset: byte offset of a tar member's data (None for plain files).
        size: the member's size (required with `tar_offset`).
    """
    if tar_offset is None:
        with open_input(source) as fh:
            return fh.read()
    tar_uri = split_tar_source(source)[0]
    with open_input(tar_uri) as fh:
        fh.seek(tar_offset)
        data = fh.read(size)
    if len(data) != size:
        raise OSError(f"tar member truncated: read {len(data)} of {size} bytes")
    return data


def json_sidecar(raw: bytes) -> tuple[str | None, str | None, str | None]:
    """(English caption, Chinese caption, `source_meta`) of a JSON sidecar, from one parse.

    The captions are its `caption_en` (or `caption`) and `caption_zh` strings; `source_meta` is
    its text, verbatim (not re-serialised, so provenance reads back exactly as crawled), when it
    is at most `META_MAX_BYTES` bytes. All None unless `raw` is one JSON object.
    """
    try:  # any encoding JSON allows (UTF-8 with or without a BOM, UTF-16, UTF-32)
        text = raw.decode(json.detect_encoding(raw)).lstrip("\ufeff").strip()
        meta = json.loads(text)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None, None, None
    if not isinstance(meta, dict):
        return None, None, None
    en = meta.get("caption_en", meta.get("caption"))
    zh = meta.get("caption_zh")
    return (
        (en.strip() or None) if isinstance(en, str) else None,  # as a .txt caption is read
        (zh.strip() or None) if isinstance(zh, str) else None,
        text if len(raw) <= META_MAX_BYTES else None,
    )


def source_meta(raw: bytes) -> str | None:
    """The `source_meta` of a JSON sidecar's bytes (`json_sidecar`)."""
    return json_sidecar(raw)[2]


def safe_text(text: str, limit: int = 500) -> str:
    """Text Arrow can hold: undecodable bytes (from file names in messages) escaped."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")[:limit]


def _text(raw: bytes) -> str | None:
    """A caption file's text: UTF-8 (a byte-order mark dropped) or UTF-16 with its mark;
    None when empty or in another encoding (a guess could turn a GBK caption into noise)."""
    encoding = "utf-16" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else "utf-8-sig"
    try:
        text = raw.decode(encoding).strip()
    except UnicodeDecodeError:
        return None
    return text or None


@dataclass(kw_only=True)
class FileReader(Stage):
    """Read each listed file's bytes, size, sha256, sidecar caption and metadata.

    Reads: `source`, `sidecar`, `meta` (optional). Writes: `data`, `size_bytes`, `sha256`,
    `caption_en`, `caption_zh` (from the `.txt` sidecar, else the JSON's `caption`),
    `source_meta` (the `.json` sidecar's text). Rejects: `unreadable` (missing, permission, I/O
    error, not a regular file: a named pipe or device is never read), `too_large` (file over
    `max_file_bytes`, never read; or grown over it while read). Resources: 1 CPU (I/O bound).
    """

    name: ClassVar[str] = "read"
    batch_size: ClassVar[int] = 4
    reads: ClassVar[tuple[str, ...]] = (schema.SOURCE, SIDECAR)
    writes: ClassVar[tuple[str, ...]] = schema.READ_COLUMNS
    max_file_bytes: int = 512 * 1024 * 1024

    def process(self, table: pa.Table) -> pa.Table:
        out: dict[str, list[Any]] = {
            c: [] for c in (*self.writes, *schema.DECISION_COLUMNS)
        }
        metas, zhs = column(table, META), column(table, SIDECAR_ZH)  # None where absent
        sources, sidecars = column(table, schema.SOURCE), column(table, SIDECAR)
        for src, side, meta, zh in zip(sources, sidecars, metas, zhs, strict=True):
            row = _read_one(src, side, meta, self.max_file_bytes, zh)
            for c in out:
                out[c].append(row.get(c))
        return set_columns(table, out)


def _read_sidecar(uri: str) -> bytes:
    """A sidecar's bytes; empty when it cannot be read or is over `SIDECAR_MAX_BYTES` (a lost
    caption loses no image)."""
    try:
        with open_input(uri) as fh:
            raw = fh.read(SIDECAR_MAX_BYTES + 1)
    except Exception:
        return b""
    return raw if len(raw) <= SIDECAR_MAX_BYTES else b""


def _read_one(
    src: str, sidecar: str | None, meta: str | None, max_bytes: int, sidecar_zh: str | None = None
) -> dict[str, Any]:
    try:
        fs, path = filesystem(local_path(src))
        size = fs.size(path)
        if size is not None and size > max_bytes:
            return {
                schema.SIZE_BYTES: size,
                schema.STATUS: schema.STATUS_REJECTED,
                schema.REASON: "too_large",
                schema.DETAIL: f"file is {size} bytes, over the {max_bytes}-byte cap; not read",
            }
        with open_input(src) as fh:
            data = fh.read(max_bytes + 1)  # a file that grows while read stops at the cap
        if len(data) > max_bytes:
            return {
                schema.SIZE_BYTES: len(data),
                schema.STATUS: schema.STATUS_REJECTED,
                schema.REASON: "too_large",
                schema.DETAIL: f"file grew over the {max_bytes}-byte cap while read; not kept",
            }
    except Exception as e:  # any I/O failure is this input's verdict, not the job's
        return {
            schema.STATUS: schema.STATUS_REJECTED,
            schema.REASON: "unreadable",
            schema.DETAIL: safe_text(f"cannot read: {type(e).__name__}: {e}"),
        }
    row: dict[str, Any] = {
        schema.DATA: data,
        schema.SIZE_BYTES: len(data),
        schema.SHA256: hashlib.sha256(data).hexdigest(),
    }
    en = zh = None
    if meta:
        en, zh, row[schema.SOURCE_META] = json_sidecar(_read_sidecar(meta))
    if sidecar and sidecar != meta:
        raw = _read_sidecar(sidecar)
        if sidecar.lower().endswith(".json"):
            en, zh, _ = json_sidecar(raw)
        else:  # the `.txt` is the English caption; the JSON's stand where it says nothing
            en = _text(raw) or en
    if sidecar_zh:
        zh = _text(_read_sidecar(sidecar_zh)) or zh
    if sidecar or sidecar_zh:
        row[schema.CAPTION_EN], row[schema.CAPTION_ZH] = en, zh
    return row


@dataclass(kw_only=True)
class TarReader(Stage):
    """Expand WebDataset tars into one row per sample (members grouped by key).

    Reads: `source` (a tar URI). Writes one row per sample: `source` (`tar-uri#member`),
    `tar_offset`, `data`, `size_bytes`, `sha256`, `caption_en`/`caption_zh` from `.txt`/`.zh.txt`
    or `.json` members, `source_meta` (the `.json` member's text). Rejects: `unreadable` for a
    tar that cannot be opened (one row for the tar) or a truncated member;
    `unsupported_format` for a member that holds no file (a symbolic link, never followed; a
    pipe; a device) and for a compressed tar (its members are read again by offset, which
    needs a plain tar); a hard link is the bytes of the member it names. A `.tar` whose
    bytes are an image is that image's row (judged by its bytes, as any mislabelled file).
    Rows whose source is in the tar's optional `done_members` list (analysed by an
    interrupted earlier run) are left out; a rerun lists there only the rows that were read,
    so a tar that ended in error is read again from the members it could not read. With
    `done_folder`, a tar read to its end without error leaves a note there (its size, ETag or
    mtime, and row count); a rerun whose `done_members` hold that many rows of that tar,
    unchanged, does not open it again (an interrupted job over many GB of S3 tars would
    otherwise read every finished tar again to skip its members).

    A tar is read as a stream and its rows leave in blocks of about `max_block_bytes` of
    member bytes (`blocks`, which the job maps), so a worker holds one block and one member,
    not the whole tar. The members of a sample lie next to each other, as WebDataset writes
    them; a caption stored more than a block after its image is a row of its own. A name
    stored again starts a new sample (rows `#name#2`, ...); `.cls`, `.npy` and other label
    members are no images; a tar is whole only with its end-of-archive block where its members
    stop (`check_tar_end`). Resources: 1 CPU; one tar per batch.
    """

    name: ClassVar[str] = "read_tar"
    batch_size: ClassVar[int] = 1
    reads: ClassVar[tuple[str, ...]] = (schema.SOURCE,)
    writes: ClassVar[tuple[str, ...]] = (schema.SOURCE, schema.TAR_OFFSET, *schema.READ_COLUMNS)
    max_file_bytes: int = 512 * 1024 * 1024
    max_block_bytes: int = 32 * 1024 * 1024
    """Member bytes per output block; a larger member is a block of its own. The reader's
    peak is about 7× this (the bytes as read, their Arrow copy, allocator slack), whatever
    the tar's size: about 370 MiB at 32 MiB (`docs/benchmarks.md`)."""

    done_folder: str | None = None
    """Where notes of completely read tars go (the job's `_work/tars`); None: none."""

    def __post_init__(self) -> None:
        if self.max_block_bytes < 1:
            raise ValueError(f"max_block_bytes must be at least 1, not {self.max_block_bytes}")

    def process(self, table: pa.Table) -> pa.Table:
        blocks = list(self._blocks(table))
        return pa.concat_tables(blocks) if blocks else self._table([])

    def blocks(self, batch: Any) -> Iterator[pa.Table]:
        """`process` as a stream of blocks, each with its stage time: what the job maps."""
        table = to_table(batch)
        if table.num_rows == 0:
            yield self.output_schema(table.schema).empty_table()
            return
        self.ready()
        start = time.perf_counter()
        for block in self._blocks(table):
            yield record_time(block, self.name, time.perf_counter() - start)
            start = time.perf_counter()

    def _blocks(self, table: pa.Table) -> Iterator[pa.Table]:
        done_lists = (
            column(table, DONE_MEMBERS)
            if DONE_MEMBERS in table.column_names
            else [None] * table.num_rows
        )
        for tar_uri, done in zip(column(table, schema.SOURCE), done_lists, strict=True):
            skip = frozenset(done or ())
            if skip and self._finished(tar_uri, len(skip)):
                continue
            for rows in self._expand(tar_uri):
                kept = [r for r in rows if r[schema.SOURCE] not in skip]
                if kept:
                    yield self._table(kept)

    def _note(self, tar_uri: str) -> str:
        """The note of a tar read to its end: `done_folder/part-<digest of its URI>.json`."""
        assert self.done_folder is not None
        return join(self.done_folder, part_name([tar_uri]).replace(".parquet", ".json"))

    def _finished(self, tar_uri: str, num_done: int) -> bool:
        """Whether an earlier run read this tar, unchanged since (`_version`), to its end, and
        every row it found is among the `num_done` analysed ones."""
        if self.done_folder is None:
            return False
        try:
            with open_input(self._note(tar_uri)) as fh:
                note = json.loads(fh.read())
            return (
                note["source"] == tar_uri
                and note["version"] == _version(tar_uri)
                and 0 < note["rows"] <= num_done
            )
        except Exception:  # no note (or an unreadable one): read the tar
            return False

    def _finish(self, tar_uri: str, rows: int, version: list[Any] | None) -> None:
        """Note that the tar was read to its end (best effort: without it, a rerun reads it)."""
        if self.done_folder is None or version is None:
            return
        with contextlib.suppress(Exception), atomic_write(self._note(tar_uri), "w") as fh:
            json.dump({"source": tar_uri, "version": version, "rows": rows}, fh)

    def _table(self, rows: list[dict[str, Any]]) -> pa.Table:
        cols = (*self.writes, *schema.DECISION_COLUMNS)
        return pa.table(
            {c: pa.array([r.get(c) for r in rows], type=schema.arrow_type(c)) for c in cols}
        )

    def _expand(self, tar_uri: str) -> Iterator[list[dict[str, Any]]]:
        """The tar's rows, in lists of about `max_block_bytes` of member bytes."""
        # Imported here: webdataset pulls in torch (~0.7 GB per worker); only tar readers pay.
        from webdataset.tariterators import base_plus_ext

        # Samples not yet emitted, in tar order, by (key, how many samples of that key the
        # tar has opened): a name stored again (`tar -r` appends a newer copy) starts a new
        # sample, as WebDataset reads it, and its rows are `tar#name#2`, `#3`, ...
        samples: dict[tuple[str, int], dict[str, Any]] = {}
        current: dict[str, tuple[str, int]] = {}  # key -> its sample in `samples`
        opened: dict[str, int] = {}  # key -> samples of that key opened in the tar
        times: dict[str, int] = {}  # member name -> times stored so far
        labels: set[str] = set()  # the rows' member names so far: each names one row
        emitted = num_rows = 0
        held = 0  # member bytes in `samples`
        error: str | None = None
        # member name -> (data offset, size): what a later hard link names
        stored: dict[str, tuple[int, int]] = {}
        in_block: dict[str, bytes] = {}  # member name -> bytes, for the block being built
        compressed: str | None = None
        version = None
        try:
            if self.done_folder is not None:
                version = _version(tar_uri)  # before the read: a tar replaced since is read again
            with open_input(tar_uri) as fh:
                compressed = _compression(fh.read(6))
                fh.seek(0)
                if compressed is not None:
                    raise tarfile.ReadError(f"{compressed}-compressed")
                with tarfile.open(fileobj=fh, mode="r|") as tf:
                    for member in tf:
                        if member.isdir():
                            continue
                        name = escape_name(member.name)
                        key, ext = base_plus_ext(name)
                        if key is None:  # no extension, or a hidden name: a sample of its own
                            key, ext = name, ""
                        sid = current.get(key)
                        if sid is None or name in samples[sid]["names"]:  # a new sample
                            if held >= self.max_block_bytes:
                                rows = _rows_of(tar_uri, samples)
                                emitted += len(samples)
                                num_rows += len(rows)
                                samples, current, held, in_block = {}, {}, 0, {}
                                yield rows
                            n = opened[key] = opened.get(key, 0) + 1
                            sid = current[key] = (key, n)
                            samples[sid] = {"members": {}, "names": set()}
                        sample = samples[sid]
                        sample["names"].add(name)
                        times[name] = times.get(name, 0) + 1
                        label = name if times[name] == 1 else f"{name}#{times[name]}"
                        k = 2
                        while label in labels:  # a member named as a repeat was: `x.jpg#2`
                            label, k = f"{name}#{k}", k + 1
                        labels.add(label)
                        members = sample["members"]
                        # A hard link is the bytes of a member stored before it (`tar` writes
                        # a hard-linked file's second name so): the same image, under its name.
                        target = stored.get(member.linkname) if member.islnk() else None
                        if not member.isfile() and target is None:
                            sample.setdefault("not_files", []).append(
                                (label, safe_text(f"{_member_kind(member)}, not a file; not read"))
                            )
                            continue
                        offset, size = target if target is not None else (
                            member.offset_data, member.size
                        )
                        failed = sample.setdefault("failed", [])  # (label, reason, detail)
                        if member.issparse():
                            # its bytes lie in chunks after a map: no offset to read again
                            failed.append((label, "unsupported_format", f"{name}: a sparse tar "
                                           "member (tar --sparse); store it as a plain file"))
                            continue
                        if size > self.max_file_bytes:
                            failed.append((label, "too_large", f"{name}: {size} bytes, over the "
                                           f"{self.max_file_bytes}-byte cap; not read"))
                            continue
                        try:
                            if target is None:
                                data = tf.extractfile(member).read()
                            elif member.linkname in in_block:  # still held: no second read
                                data = in_block[member.linkname]
                            else:  # in a block already gone: read again at its offset
                                data = read_bytes(f"{tar_uri}#{name}", offset, size)
                        except Exception as e:
                            failed.append((label, "unreadable",
                                           safe_text(f"{name}: {type(e).__name__}: {e}")))
                            continue
                        if len(data) != size:
                            failed.append((label, "unreadable", f"{name}: truncated tar member"))
                            continue
                        # `x.jpg` and `x.JPG` in one tar are two images, not one (a name
                        # stored again is a new sample, so one of these slots is free)
                        slot = next(e for e in (ext.lower(), ext, name) if e not in members)
                        members[slot] = (label, offset, data)
                        held += len(data)
                        if target is None:
                            stored[member.name] = (offset, size)
                            in_block[member.name] = data
                    check_tar_end(fh, tf.offset)
        except Exception as e:
            error = safe_text(f"{type(e).__name__}: {e}")
        if compressed is not None:
            yield [_compressed_row(tar_uri, compressed)]
            return
        if (
            error is not None
            and not emitted
            and not samples
            and (image := self._image_named_tar(tar_uri))
        ):
            yield [image]
            return
        rows = _rows_of(tar_uri, samples)
        emitted += len(samples)
        if error is None and emitted:
            self._finish(tar_uri, num_rows + len(rows), version)
        if not emitted:  # a tar with no sample still gets its row: no input vanishes
            reason, detail = (
                ("unsupported_format", "tar holds no sample")
                if error is None
                # 0 bytes, as an empty image is: no read to try again
                else ("decode_error", "empty file (0 bytes)")
                if error == "ReadError: empty file"
                # its first block is no tar header: read whole, it is no tar (nor an image),
                # and reading it again on every rerun would not change that
                else ("decode_error", f"not a tar (nor an image): {error}")
                if error in NOT_A_TAR
                else ("unreadable", f"cannot read tar: {error}")
            )
            rows.append(
                {
                    schema.SOURCE: tar_uri,
                    schema.STATUS: schema.STATUS_REJECTED,
                    schema.REASON: reason,
                    schema.DETAIL: detail,
                }
            )
        elif error is not None:
            rows.append(
                {
                    schema.SOURCE: f"{tar_uri}#<rest>",
                    schema.STATUS: schema.STATUS_REJECTED,
                    schema.REASON: "unreadable",
                    schema.DETAIL: f"tar ends in error after {emitted} samples: {error}",
                }
            )
        yield rows

    def _image_named_tar(self, uri: str) -> dict[str, Any] | None:
        """The file row of a `.tar` that is no tar but an image (judged by its bytes, as a
        mislabelled image is), else None."""
        row = _read_one(uri, None, None, self.max_file_bytes)
        if schema.DATA not in row:
            return None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                Image.open(io.BytesIO(row[schema.DATA])).close()
        except Exception:  # not an image either: the tar's own verdict stands
            return None
        return {schema.SOURCE: uri, **row}


NOT_A_TAR = frozenset(
    f"ReadError: {m}" for m in ("invalid header", "bad checksum", "truncated header")
)
"""What tarfile says of a file whose first block is no tar header (a tar cut short inside a
member says "unexpected end of data", and stays `unreadable`: a copy again may mend it)."""


_COMPRESSIONS = (
    (b"\x1f\x8b", "gzip"),
    (b"BZh", "bzip2"),
    (b"\xfd7zXZ", "xz"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
)


def _version(uri: str) -> list[Any]:
    """What tells this file from a replaced one: its size and its ETag (object stores) or
    modification time."""
    fs, path = filesystem(local_path(uri))
    info = fs.info(path)
    stamp = info.get("ETag") or info.get("mtime") or info.get("LastModified") or ""
    return [info.get("size"), str(stamp)]


def _compression(head: bytes) -> str | None:
    """The compression a tar's first bytes name, or None for a plain tar."""
    return next((name for magic, name in _COMPRESSIONS if head.startswith(magic)), None)


def _compressed_row(tar_uri: str, compression: str) -> dict[str, Any]:
    """The one row of a compressed tar: refused, with what to do."""
    return {
        schema.SOURCE: tar_uri,
        schema.STATUS: schema.STATUS_REJECTED,
        schema.REASON: "unsupported_format",
        schema.DETAIL: (
            f"a {compression}-compressed tar: its members are read again by offset when "
            "their shards are written, which needs a plain tar; decompress it and list the "
            ".tar"
        ),
    }


def check_tar_end(fh: Any, offset: int) -> None:
    """Raise `tarfile.ReadError` unless the tar's end-of-archive block lies at `offset`, where
    its member headers stopped, with no second archive after it.

    A stream read ends quietly where the bytes do, so a tar cut at (or inside) a header would
    pass for a whole one. After the end block, zero padding or bytes a tool appended are
    ignored, but a tar header there (`cat a.tar b.tar`) names members no reader would see.
    """
    fh.seek(offset)
    if fh.read(512) != bytes(512):
        size = fh.seek(0, 2)
        raise tarfile.ReadError(
            f"its members stop at byte {offset} of {size} with no end-of-archive block there "
            "(cut short, or a corrupt header)"
        )
    pos = offset + 512
    while pos < offset + _TRAILER_SCAN and (chunk := fh.read(64 * 1024)):
        rest = chunk.lstrip(b"\0")
        if rest:
            start = pos + len(chunk) - len(rest)
            start -= (start - offset) % 512
            fh.seek(start)
            try:
                tarfile.TarInfo.frombuf(fh.read(512), "utf-8", "surrogateescape")
            except tarfile.HeaderError:
                return  # not a header: bytes appended after the archive
            raise tarfile.ReadError(
                f"a second archive starts at byte {start}, after the end-of-archive block "
                "(tars joined with `cat`?); its members are not read: write them as one tar"
            )
        pos += len(chunk)


_TRAILER_SCAN = 1024 * 1024
"""How far past a tar's end-of-archive block `check_tar_end` looks for a second archive (tar
pads its last record with zeros, 10 KiB by default)."""


def _rows_of(tar_uri: str, samples: dict[tuple[str, int], dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of `samples` ((key, n) -> sample), in tar order."""
    return [
        row
        for (key, n), sample in samples.items()
        for row in _sample_rows(tar_uri, key if n == 1 else f"{key}#{n}", sample)
    ]


def _member_kind(member: tarfile.TarInfo) -> str:
    """What a tar member that holds no file data is, in words."""
    if member.issym():
        return f"a symbolic link to {escape_name(member.linkname)!r} (links are not followed)"
    if member.islnk():
        return f"a hard link to {escape_name(member.linkname)!r}, which no earlier member is"
    if member.isfifo():
        return "a named pipe"
    if member.ischr() or member.isblk():
        return "a device"
    return "a special member"


def _sidecar_slot(slot: str) -> tuple[str, str] | None:
    """(inner name, kind) of a caption, metadata or label member's slot, else None (an
    image): `txt` -> ("", "en"), `v2.zh.txt` -> ("v2", "zh"), `json` -> ("", "meta"), `cls`
    -> ("", "label"). WebDataset's key ends at the first dot, so `photo.v2.jpg` and
    `photo.v2.txt` are slots `v2.jpg` and `v2.txt` of sample `photo`."""
    slot = slot.lower()
    for kind, exts in (("zh", CAPTION_ZH_EXTS), ("en", CAPTION_EXTS), ("meta", META_EXTS),
                       ("label", LABEL_EXTS)):  # fmt: skip
        for e in exts:
            if slot == e:
                return "", kind
            if slot.endswith("." + e):
                return slot[: -len(e) - 1], kind
    return None


def _captions(
    sidecars: dict[tuple[str, str], bytes], image_slot: str
) -> tuple[str | None, str | None, str | None]:
    """(English caption, Chinese caption, `source_meta`) of one image of a sample: its own
    sidecars (`v2.txt` for `v2.jpg`, or `jpg.txt`) before the sample's (`txt`); at each level
    a `.txt` caption before the `.json`'s."""
    own = image_slot.lower()
    levels = dict.fromkeys((own, own.rsplit(".", 1)[0] if "." in own else "", ""))
    en = zh = meta = None
    for inner in reversed(levels):  # the sample's first, the image's own last: it wins
        if (raw := sidecars.get((inner, "meta"))) is not None:
            j_en, j_zh, j_meta = json_sidecar(raw)
            en, zh, meta = j_en or en, j_zh or zh, j_meta or meta
        if (raw := sidecars.get((inner, "en"))) is not None:
            en = _text(raw) or en
        if (raw := sidecars.get((inner, "zh"))) is not None:
            zh = _text(raw) or zh
    return en, zh, meta


def _sample_rows(tar_uri: str, key: str, sample: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows of one sample: one per image member (with the captions that belong to it),
    one per member that is no file, and one for a sample with no image or a failed read."""
    members = sample["members"]
    sidecars: dict[tuple[str, str], bytes] = {}
    images = []
    for slot, (_, _, data) in members.items():
        kind = _sidecar_slot(slot)
        if kind is None:
            images.append(slot)
        else:  # over the cap, as a sidecar file over it: no caption
            sidecars.setdefault(kind, data if len(data) <= SIDECAR_MAX_BYTES else b"")
    rows = []
    for slot in sorted(images):
        name, offset, data = members[slot]
        en, zh, meta = _captions(sidecars, slot)
        rows.append(
            {
                schema.SOURCE: f"{tar_uri}#{name}",
                schema.TAR_OFFSET: offset,
                schema.DATA: data,
                schema.SIZE_BYTES: len(data),
                schema.SHA256: hashlib.sha256(data).hexdigest(),
                schema.CAPTION_EN: en,
                schema.CAPTION_ZH: zh,
                schema.SOURCE_META: meta,
            }
        )
    for name, detail in sample.get("not_files", ()):
        rows.append(
            {
                schema.SOURCE: f"{tar_uri}#{name}",
                schema.STATUS: schema.STATUS_REJECTED,
                schema.REASON: "unsupported_format",
                schema.DETAIL: detail,
            }
        )
    if not images and not sample.get("failed") and "not_files" not in sample:
        # captions or metadata without an image
        rows.append(
            {
                schema.SOURCE: f"{tar_uri}#{key}",
                schema.STATUS: schema.STATUS_REJECTED,
                schema.REASON: "unsupported_format",
                schema.DETAIL: "sample has no image member, only "
                + ", ".join(f".{e}" for e in sorted(members)),
            }
        )
    for label, reason, detail in sample.get("failed", ()):  # members that were not read
        rows.append(
            {
                schema.SOURCE: f"{tar_uri}#{label}",
                schema.STATUS: schema.STATUS_REJECTED,
                schema.REASON: reason,
                schema.DETAIL: detail[:500],
            }
        )
    return rows
