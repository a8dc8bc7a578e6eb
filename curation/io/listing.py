"""List a job's inputs: local folders, URI list files, `s3://` prefixes and WebDataset tars.

Listing yields small rows (URIs, no bytes). Each image file becomes one input row, with the
URI of its sidecar caption when one exists; each tar becomes one row that the `TarReader`
expands into its members.

Names are kept as text the manifest can hold: a local path (or a tar member name) that is not
valid UTF-8 is recorded losslessly as RFC 3986 percent-encoding of its raw bytes; a local file
then appears as a `file://` URI (`local_path` turns it back into the path). Symbolic links:
a linked file inside an input folder is read through its link (the source is the link's
path); a linked folder inside an input folder is not descended, so link loops cannot occur
(an INPUT argument that is itself a link to a folder is listed); a dangling link becomes an
`unreadable` row. A folder that cannot be listed (no permission) is one input row of its own,
which the reader rejects as `unreadable`.
"""

from __future__ import annotations

import functools
import io
import itertools
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from urllib.parse import quote, unquote_to_bytes

import braceexpand
import fsspec
from fsspec.implementations.local import LocalFileSystem, make_path_posix

from curation.io.atomic import is_local

TAR_EXTENSIONS = (".tar",)


@dataclass(frozen=True)
class InputItem:
    """One listed input: a file (maybe with sidecars) or a tar to expand."""

    uri: str
    kind: str  # "file" | "tar"
    sidecar: str | None = None  # the caption sidecar (the first of the sidecar extensions)
    meta: str | None = None  # the `<stem>.json` metadata sidecar, when json is a sidecar extension
    sidecar_zh: str | None = None  # `<stem>.zh.txt`: the Chinese caption, when txt is a sidecar


def filesystem(uri: str, **storage_options: object) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for a URI and the path inside it.

    A local path (no `scheme://`) is taken as it is: fsspec reads `::` as URL chaining, so a
    file named `a::b.jpg` would otherwise be looked for as `a`.
    """
    if "://" not in uri:
        return LocalFileSystem(), make_path_posix(uri)
    protocol = uri.partition("://")[0]
    if "::" in uri and protocol.isalnum():  # an S3 key may hold `::`: no URL chaining here
        fs = fsspec.filesystem(protocol.lower(), **storage_options)
        return fs, fs._strip_protocol(uri)
    fs, path = fsspec.core.url_to_fs(uri, **storage_options)
    return fs, path


def text_name(name: str) -> str | None:
    """`name` when it is valid UTF-8 text, else None (it holds undecodable bytes)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return name


def escape_name(name: str) -> str:
    """A member name as manifest text: unchanged, or percent-encoded when not valid UTF-8."""
    return text_name(name) or quote(name.encode("utf-8", "surrogateescape"), safe="/")


def local_source(path: str) -> str:
    """A local path as a manifest `source`: the path, or a `file://` URI when not UTF-8."""
    path = os.path.abspath(path)
    if text_name(path) is not None:
        return path
    return "file://" + quote(os.fsencode(path), safe="/")


def local_path(source: str) -> str:
    """The path to open for a `source` (undoes `local_source`; other URIs unchanged)."""
    if source.startswith("file://"):
        return os.fsdecode(unquote_to_bytes(source.removeprefix("file://")))
    return source


_TAR_MEMBER = re.compile(r"\.tar#", re.IGNORECASE)


def split_tar_source(source: str) -> tuple[str, str]:
    """(tar URI, member name) of a tar member's `source` (`tar-uri#member`).

    Split at the first `.tar#`, so member names may hold `#`.
    """
    m = _TAR_MEMBER.search(source)
    if m is None:
        tar, _, member = source.rpartition("#")
        return tar, member
    return source[: m.start() + 4], source[m.end() :]


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def _uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    if _is_local(fs):
        return local_source(path)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return f"{protocol}://{path}"


def _iter_local(
    folder: str, exclude: str | None = None, unlisted: list[str] | None = None
) -> Iterator[str]:
    """Every file under a local folder, lazily; linked folders are not descended (no loops),
    nor hidden or system ones (`.git/`, `.Trash-1000/`, `@eaDir`: `skipped_folder`), nor the
    folder ``exclude`` (compared by real path: a link to either side is seen through);
    folders that cannot be listed go to ``unlisted``.

    A walk with its own stack, not `os.walk`, which recurses once per level in this Python
    and failed the listing of a folder nested about a thousand levels deep.
    """
    exclude = os.path.realpath(exclude) if exclude is not None else None
    stack = [folder]
    while stack:
        top = stack.pop()
        try:
            with os.scandir(top) as it:
                entries = list(it)
        except OSError as e:
            if unlisted is not None:
                unlisted.append(e.filename if isinstance(e.filename, str) else top)
            continue
        for entry in entries:
            try:
                is_dir, is_link = entry.is_dir(), entry.is_symlink()
            except OSError:  # as `os.walk`: what cannot be looked at is a file
                is_dir, is_link = False, False
            if not is_dir:
                yield entry.path
            elif (
                not is_link
                and not skipped_folder(entry.name)
                and (exclude is None or os.path.realpath(entry.path) != exclude)
            ):
                stack.append(entry.path)


SYSTEM_FOLDERS = frozenset({"@eadir", "#recycle", "#snapshot", "$recycle.bin", "recycler",
                            "system volume information", "__macosx"})
"""Folders (compared case-insensitively) that storage systems keep beside the pictures, left
out of a folder walk as hidden ones are: a Synology NAS's thumbnail store (`@eaDir/<picture>/
SYNOPHOTO_THUMB_*.jpg`, five per picture), recycle bin (`#recycle`) and snapshots
(`#snapshot`: a second copy of the share), Windows' recycle bins and volume metadata, and the
resource forks of a zip made on a Mac (`__MACOSX`)."""


def skipped_folder(name: str) -> bool:
    """Whether a folder walk leaves out a folder of this name: hidden (`.git`, `.Trash-1000`,
    `.thumbnails`) or one of `SYSTEM_FOLDERS`. `.` and `..` are no hidden folders: an S3 key
    may hold them as segments (`p/./a.jpg`), and a local walk never yields them."""
    if name in (".", ".."):
        return False
    return name.startswith(".") or name.casefold() in SYSTEM_FOLDERS


def in_hidden_folder(path: str, root: str) -> bool:
    """Whether `path` lies in a folder below `root` that a walk leaves out (`skipped_folder`).

    A folder walk lists no file there, as it lists no hidden file: a version-control store,
    a desktop's trash of deleted pictures (`.Trash-1000/files/`), thumbnail caches, a NAS's
    recycle bin. Naming such a folder as an INPUT lists it.
    """
    inner = path[len(root) :].strip("/").split("/")[:-1]
    return any(skipped_folder(part) for part in inner)


def _walk_local(folder: str, exclude: str | None = None) -> tuple[list[str], list[str]]:
    """(every file under a local folder, the folders that could not be listed): see
    `_iter_local`."""
    unlisted: list[str] = []
    return list(_iter_local(folder, exclude, unlisted)), unlisted


def _stem(path: str) -> str:
    """`path` without its extension, as written: pathlib's `with_suffix` also drops `./` parts
    and doubled slashes, and then no longer matched `<stem>.zh.txt` cut from the text."""
    return path[: len(path) - len(PurePosixPath(path).suffix)]


def _group_folder(
    fs: fsspec.AbstractFileSystem,
    paths: Iterable[str],
    sidecar_exts: tuple[str, ...],
    named: bool = False,
) -> Iterator[InputItem]:
    """Pair images with sidecars; every non-sidecar file is an input.

    Hidden files (`.DS_Store`, `._x.jpg`) and `_SUCCESS` inside a folder are not inputs;
    `named`: the paths were INPUT arguments themselves, and each is an input whatever its name.
    """
    paths = sorted(paths)
    by_stem: dict[str, dict[str, str]] = {}
    for p in paths:
        pp = PurePosixPath(p)
        by_stem.setdefault(_stem(p), {})[pp.suffix.lower().lstrip(".")] = p
    zh_files = {p for p in paths if "txt" in sidecar_exts and p.lower().endswith(".zh.txt")}
    zh_of = {p[: -len(".zh.txt")]: p for p in zh_files}  # image stem -> its Chinese caption

    def has_image(exts: Iterable[str]) -> bool:
        """Whether a stem's extensions name an image: a sidecar or a tar (whose samples carry
        their own captions) takes no sidecar, so one beside it is an input of its own."""
        return any(e not in sidecar_exts and f".{e}" not in TAR_EXTENSIONS for e in exts)

    for p in paths:
        pp = PurePosixPath(p)
        name = pp.name
        if not named and (name.startswith(".") or name == "_SUCCESS"):
            continue
        ext = pp.suffix.lower().lstrip(".")
        stem = _stem(p)
        siblings = by_stem[stem]
        if ext in sidecar_exts and has_image(siblings):
            continue  # a sidecar of an image with the same stem
        if not named and p in zh_files and has_image(by_stem.get(p[: -len(".zh.txt")], {})):
            continue  # `<stem>.zh.txt`: the Chinese caption of an image `<stem>.<ext>`
        if ext in sidecar_exts and ext == "json":
            continue  # stray metadata, not an image
        if p.lower().endswith(TAR_EXTENSIONS):
            yield InputItem(_uri(fs, p), "tar")
            continue
        sidecar = meta = None
        if ext not in sidecar_exts:
            for se in sidecar_exts:
                if se in siblings:
                    sidecar = _uri(fs, siblings[se])
                    break
            if "json" in sidecar_exts and "json" in siblings:
                meta = _uri(fs, siblings["json"])
        zh = zh_of.get(stem)
        yield InputItem(_uri(fs, p), "file", sidecar, meta, _uri(fs, zh) if zh else None)


@dataclass(frozen=True)
class InputSpec:
    """One INPUT argument after brace expansion: a folder, a URI list file, a tar or a file.

    Planning an INPUT costs one `exists`/`isdir` call; expanding it (`expand_input`) lists
    its files and can run anywhere, e.g. in a Ray task, so the driver holds no per-file row.
    """

    uri: str
    kind: str  # "folder" | "list" | "tar" | "file"


def few_local_files(specs: Iterable[InputSpec], limit: int) -> bool:
    """Whether the inputs are local files and folders holding at most `limit` files in all.

    A bounded look for planning (e.g. whether to start a small job's model actor early): the
    walk stops at the `limit + 1`-th file, so a huge folder costs no more than a small one.
    Linked folders are not descended, as in the listing. Lists, tars and remote inputs count
    as many.
    """
    count = 0
    for spec in specs:
        if not is_local(spec.uri) or spec.kind not in ("file", "folder"):
            return False
        if spec.kind == "file":
            count += 1
        else:
            path = spec.uri.removeprefix("file://")
            count += sum(1 for _ in itertools.islice(_iter_local(path), limit + 1 - count))
        if count > limit:
            return False
    return True


def plan_inputs(
    inputs: Iterable[str],
    *,
    list_extensions: Iterable[str] = ("lst", "list", "uris"),
    storage_options: dict | None = None,
) -> list[InputSpec]:
    """Classify every INPUT argument (brace patterns expanded), in order.

    Raises:
        ValueError: an INPUT that does not exist.
    """
    list_exts = tuple("." + e.lower() for e in list_extensions)
    specs = []
    for raw in inputs:
        for inp in braceexpand.braceexpand(raw):
            fs, path = filesystem(inp, **(storage_options or {}))
            named_object = _is_object(fs, inp, path)
            if not named_object and fs.isdir(path):
                specs.append(InputSpec(inp, "folder"))
            elif named_object or fs.exists(path):  # an object found needs no second look
                if path.lower().endswith(list_exts):
                    specs.append(InputSpec(inp, "list"))
                elif path.lower().endswith(TAR_EXTENSIONS):
                    specs.append(InputSpec(_uri(fs, path), "tar"))
                else:
                    specs.append(InputSpec(inp, "file"))
            else:
                raise ValueError(f"input {inp!r} does not exist")
    return specs


def _is_object(fs: fsspec.AbstractFileSystem, inp: str, path: str) -> bool:
    """Whether a remote INPUT without a trailing `/` names an object: an object store's key
    may also be a prefix (`a.jpg` and `a.jpg/b.jpg`), and the named object is then the input
    (`a.jpg/` names the prefix). One request for an object, as `isdir` would cost."""
    if _is_local(fs) or inp.endswith("/"):
        return False
    fs.invalidate_cache(path)  # a listing's cache may know the key only as a prefix
    return fs.isfile(path)


def _location(spec: InputSpec, real: Callable[[str], str]) -> tuple[str, tuple[str, ...]]:
    """Where an INPUT lies, as (scheme, path parts), for `drop_covered_inputs`.

    A local folder by its real path (`./`, `..`, trailing slashes and links resolved); a local
    file by its folder's real path and its own name (a linked file is listed under its link's
    name, so the link itself is not resolved); a remote prefix or object by its path, trailing
    slash dropped (an S3 key is what it says: `d//b.jpg` and `p/./a.jpg` are keys of their own,
    not `d/b.jpg` and `p/a.jpg`). `real`: `os.path.realpath`, cached over the INPUTs (brace
    patterns name thousands of files in a few folders).
    """
    if is_local(spec.uri):
        path = os.path.abspath(local_path(spec.uri))
        if spec.kind == "folder":
            path = real(path)
        else:
            path = os.path.join(real(os.path.dirname(path)), os.path.basename(path))
        return "", tuple(p for p in path.split(os.sep) if p)
    scheme, _, rest = spec.uri.partition("://")
    parts = rest.split("/")
    if len(parts) > 1 and parts[-1] == "":  # a prefix's trailing slash
        parts.pop()
    return scheme.lower(), tuple(parts)


def _path_of(scheme: str, parts: tuple[str, ...]) -> str:
    return f"{scheme}://{'/'.join(parts)}" if scheme else os.sep + os.sep.join(parts)


def _walk_lists(
    scheme: str, parts: tuple[str, ...], sidecar_exts: tuple[str, ...], **storage_options: object
) -> bool:
    """Whether a folder walk lists this file as an input of its own (`_group_folder`'s rules:
    not hidden, not `_SUCCESS`, not the sidecar of an image beside it, not stray metadata).

    Only a file with a sidecar extension needs a look at its folder: the names that share its
    stem."""
    name = parts[-1]
    if name.startswith(".") or name == "_SUCCESS":
        return False
    if PurePosixPath(name).suffix.lower().lstrip(".") not in sidecar_exts:
        return True
    fs, path = filesystem(_path_of(scheme, parts), **storage_options)
    folder = path.rsplit("/", 1)[0]
    stem = name[: -len(".zh.txt")] if name.lower().endswith(".zh.txt") else name.rsplit(".", 1)[0]
    try:
        if _is_local(fs):
            with os.scandir(folder) as it:
                names = [e.name for e in it]
        else:
            names = [p.rsplit("/", 1)[-1] for p in fs.ls(folder, detail=False)]
    except OSError:
        return False  # the walk cannot list that folder either: the file stays an INPUT
    beside = [f"{folder}/{n}" for n in names if n.startswith(stem + ".") and n != name]
    named = _uri(fs, path)
    return any(i.uri == named for i in _group_folder(fs, [path, *beside], sidecar_exts))


def _reached(
    scheme: str, folder: tuple[str, ...], inner: tuple[str, ...], readable: Callable[[str], bool]
) -> bool:
    """Whether a folder walk from `folder` reaches every folder down to `inner`: none of the
    ones between is hidden (`in_hidden_folder`), and locally each is `readable` (one that is
    not becomes an `unreadable` row instead)."""
    if any(skipped_folder(part) for part in inner[len(folder) :]):
        return False
    if scheme:
        return True
    below = range(len(folder) + 1, len(inner) + 1)
    return all(readable(_path_of(scheme, inner[:n])) for n in below)


def drop_covered_inputs(
    specs: Sequence[InputSpec],
    *,
    sidecar_extensions: Iterable[str] = ("txt", "json"),
    exclude: str | None = None,
    storage_options: dict | None = None,
) -> tuple[list[InputSpec], str | None]:
    """The INPUTs that no other INPUT lists already, in order, and a note naming the others.

    A folder (or prefix) covers the folders, files and tars inside it, and an INPUT given
    twice (`DIR`, `./DIR/`, a link to it) covers its repeat. A file that the folder walk
    would not list (hidden, a sidecar of an image beside it) stays, since naming it makes it
    an input; so do list files (their lines are inputs of their own), and anything under
    ``exclude`` (the job's OUT, which a folder walk skips). The decision costs no listing,
    but a look at the names beside a named file with a sidecar extension.
    """
    sidecar_exts = tuple(e.lower() for e in sidecar_extensions)
    real = functools.cache(os.path.realpath)
    readable = functools.cache(lambda path: os.access(path, os.R_OK | os.X_OK))
    out = _location(InputSpec(exclude, "folder"), real) if exclude is not None else None
    located = [(_location(s, real), s) for s in specs]
    folders: dict[tuple[str, tuple[str, ...]], InputSpec] = {}
    for loc, spec in located:
        if spec.kind == "folder":
            folders.setdefault(loc, spec)
    seen: dict[tuple[str, tuple[str, ...], bool], int] = {}
    kept: list[InputSpec] = []
    said: list[str] = []
    for i, ((scheme, parts), spec) in enumerate(located):
        # On S3 an object `x.jpg` and the prefix `x.jpg/` are two inputs with one path.
        same = (scheme, parts, bool(scheme) and spec.kind == "folder")
        first = specs[seen.setdefault(same, i)]
        if seen[same] != i:
            said.append(f"{spec.uri} is given twice" if spec.uri == first.uri
                        else f"{spec.uri} is the same as {first.uri}")  # fmt: skip
            continue
        outer = None
        if spec.kind != "list":
            for n in range(1, len(parts)):  # the outermost folder INPUT above it
                above = folders.get((scheme, parts[:n]))
                if above is None:
                    continue
                # A folder walk skips OUT when OUT lies inside the folder.
                skipped = (out is not None and out[0] == scheme and len(out[1]) > n
                           and parts[: len(out[1])] == out[1])  # fmt: skip
                inner = parts if spec.kind == "folder" else parts[:-1]
                if not skipped and _reached(scheme, parts[:n], inner, readable) and (
                    spec.kind == "folder"
                    or _walk_lists(scheme, parts, sidecar_exts, **(storage_options or {}))
                ):
                    outer = above
                    break
        if outer is None:
            kept.append(spec)
        else:
            said.append(f"{spec.uri} is inside {outer.uri}")
    if not said:
        return kept, None
    if len(said) == 1:
        return kept, f"{said[0]}, listed once"
    more = f" (and {len(said) - 3:,} more INPUTs that others cover)" if len(said) > 3 else ""
    return kept, f"{'; '.join(said[:3])}{more}: each listed once"


def parse_uri_line(line: str, base: str | None = None) -> Iterator[InputItem]:
    """The inputs one line of a URI list file names (none for blanks and `#` comments).

    Listed URIs are taken as they are: one that cannot be read becomes an `unreadable`
    manifest row, not a failed job. A relative path is relative to ``base``, the folder of the
    list file (a local path or a URI prefix), as in a playlist: never to the working folder of
    whichever worker expands the list.
    """
    line = line.strip()
    if not line or line.startswith("#"):
        return
    for u in braceexpand.braceexpand(line):
        kind = "tar" if u.lower().endswith(TAR_EXTENSIONS) else "file"
        if "://" not in u:
            if base is not None and not os.path.isabs(u):
                if "://" in base:
                    yield InputItem(base.rstrip("/") + "/" + u.removeprefix("./"), kind)
                    continue
                u = os.path.join(base, u)
            u = local_source(u)
        elif u.startswith("file://"):  # as a folder lists it: the path, unless not UTF-8
            u = local_source(local_path(u))
        yield InputItem(u, kind)


def expand_input(
    spec: InputSpec,
    *,
    sidecar_extensions: Iterable[str] = ("txt", "json"),
    storage_options: dict | None = None,
    exclude: str | None = None,
) -> Iterator[InputItem]:
    """Every input item of one planned INPUT, in a deterministic order (list files stream).

    ``exclude``: a folder or prefix (the job's OUT) whose files a folder INPUT does not list,
    so that an OUT inside an INPUT folder never feeds the job its own shards and manifest.
    """
    sidecar_exts = tuple(e.lower() for e in sidecar_extensions)
    fs, path = filesystem(local_path(spec.uri), **(storage_options or {}))
    if spec.kind == "folder":
        unlisted: list[str] = []
        if _is_local(fs):
            skip = local_path(exclude) if exclude is not None and is_local(exclude) else None
            files, unlisted = _walk_local(path, skip)
        else:
            root = path.rstrip("/")
            # `find` lists objects. A key ending in `/` is a console's "folder" marker, no
            # input; a key that is also a prefix (`a.jpg` and `a.jpg/b.jpg`) is an object.
            files = [
                p for p in fs.find(path) if not p.endswith("/") and not in_hidden_folder(p, root)
            ]
            if exclude is not None and not is_local(exclude):
                skip = fsspec.core.url_to_fs(exclude, **(storage_options or {}))[1].rstrip("/")
                files = [p for p in files if p != skip and not p.startswith(skip + "/")]
        yield from _group_folder(fs, files, sidecar_exts)
        # A folder that cannot be listed (no permission) is an input of its own, so that the
        # files it hides are not lost without a word: the reader rejects it as `unreadable`.
        yield from (InputItem(_uri(fs, d), "file") for d in unlisted)
    elif spec.kind == "list":
        base = os.path.dirname(local_path(spec.uri)) if is_local(spec.uri) else (
            spec.uri.rsplit("/", 1)[0])
        with fs.open(path, "rb") as raw:
            bom = raw.read(2)
            raw.seek(0)
            # A byte-order mark is not part of the first name: Windows tools write lists in
            # UTF-8 with one (Notepad) or in UTF-16 (PowerShell's `>`).
            encoding = "utf-16" if bom in (b"\xff\xfe", b"\xfe\xff") else "utf-8-sig"
            # A URI the list names again is not listed again (the URIs seen are held: a set
            # of the list's names, less than a folder walk of as many files holds).
            seen: set[str] = set()
            with io.TextIOWrapper(raw, encoding=encoding, errors="surrogateescape") as fh:
                for line in fh:
                    for item in parse_uri_line(line, base):
                        if item.uri not in seen:
                            seen.add(item.uri)
                            yield item
    elif spec.kind == "tar":
        yield InputItem(spec.uri, "tar")
    else:
        named = _uri(fs, path)
        for item in _group_folder(fs, [path, *_sidecars_beside(fs, path, sidecar_exts)],
                                  sidecar_exts, named=True):  # fmt: skip
            if item.uri == named:  # its sidecars travel with it, as in a folder
                yield item


def _sidecars_beside(
    fs: fsspec.AbstractFileSystem, path: str, sidecar_exts: tuple[str, ...]
) -> list[str]:
    """The sidecar files of an image named as an INPUT (`<stem>.txt`, `.json`, `.zh.txt`):
    a few look-ups, as a named INPUT is one file, not a folder to list."""
    pp = PurePosixPath(path)
    if pp.suffix.lower().lstrip(".") in sidecar_exts:
        return []  # a caption file named as an INPUT is an input of its own
    stem = _stem(path)
    names = [f"{stem}.{e}" for e in sidecar_exts]
    if "txt" in sidecar_exts:
        names.append(f"{stem}.zh.txt")
    return [n for n in names if fs.isfile(n)]


def list_inputs(
    inputs: Iterable[str],
    *,
    sidecar_extensions: Iterable[str] = ("txt", "json"),
    list_extensions: Iterable[str] = ("lst", "list", "uris"),
    storage_options: dict | None = None,
) -> Iterator[InputItem]:
    """Yield every input item of the given INPUT arguments once, in a deterministic order.

    The job expands the planned INPUTs in Ray tasks instead (`plan_inputs`, `expand_input`).

    Args:
        inputs: local folders, `s3://` prefixes, URI list files, tar files or brace patterns.
        sidecar_extensions: extensions of caption sidecars (not inputs themselves).
        list_extensions: a file INPUT with one of these extensions lists one URI per line.
        storage_options: fsspec options (e.g. the S3 endpoint).

    Raises:
        ValueError: an INPUT that does not exist.
    """
    specs, _ = drop_covered_inputs(
        plan_inputs(inputs, list_extensions=list_extensions, storage_options=storage_options),
        sidecar_extensions=sidecar_extensions,
        storage_options=storage_options,
    )
    for spec in specs:
        yield from expand_input(
            spec, sidecar_extensions=sidecar_extensions, storage_options=storage_options
        )
