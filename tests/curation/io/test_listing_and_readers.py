import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
from pathlib import Path
from urllib.parse import quote

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from curation import schema
from curation.io.listing import InputItem, InputSpec, few_local_files, list_inputs, plan_inputs
from curation.io.readers import (
    META,
    SIDECAR,
    SIDECAR_ZH,
    FileReader,
    TarReader,
    read_bytes,
    source_meta,
)


def _tar(path, members):
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_listing_walks_folders_pairs_sidecars_and_reads_lists(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "x.jpg").write_bytes(b"x")
    (tmp_path / "a" / "x.txt").write_text("cap x")
    (tmp_path / "a" / "b" / "y.png").write_bytes(b"y")
    (tmp_path / "a" / "b" / "y.json").write_text(json.dumps({"caption": "cap y"}))
    (tmp_path / "a" / "stray.json").write_text("{}")
    (tmp_path / "a" / ".hidden.jpg").write_bytes(b"h")
    _tar(tmp_path / "a" / "s-000.tar", [("k.jpg", b"k")])
    items = list(list_inputs([str(tmp_path / "a")]))
    kinds = {
        i.uri.rsplit("/", 1)[-1]: (i.kind, i.sidecar and i.sidecar.rsplit("/", 1)[-1])
        for i in items
    }
    assert kinds == {
        "x.jpg": ("file", "x.txt"),
        "y.png": ("file", "y.json"),
        "s-000.tar": ("tar", None),
    }

    # Named as an INPUT, a hidden file is an input like any other.
    assert [i.uri for i in list_inputs([str(tmp_path / "a" / ".hidden.jpg")])] == [
        f"{tmp_path}/a/.hidden.jpg"]

    lst = tmp_path / "inputs.lst"
    lst.write_text(f"{tmp_path}/a/x.jpg\n# comment\n{tmp_path}/missing.jpg\n"
                   "a/b/y.png\n./rel.jpg\n")  # relative: to the list's folder
    listed = [i.uri for i in list_inputs([str(lst)])]
    assert listed == [f"{tmp_path}/a/x.jpg", f"{tmp_path}/missing.jpg",
                      f"{tmp_path}/a/b/y.png", f"{tmp_path}/rel.jpg"]


def test_an_image_named_as_an_input_brings_its_sidecars(tmp_path):
    """`native4k curate photo.jpg` dropped `photo.txt` beside it: the caption, the metadata
    and the Chinese caption travelled only with images found inside a folder INPUT."""
    (tmp_path / "x.jpg").write_bytes(b"x")
    (tmp_path / "x.txt").write_text("cap x")
    (tmp_path / "x.json").write_text(json.dumps({"url": "u"}))
    (tmp_path / "x.zh.txt").write_text("中文")
    (tmp_path / ".h.png").write_bytes(b"h")
    (tmp_path / ".h.json").write_text(json.dumps({"caption": "cap h"}))
    (tmp_path / "bare.jpg").write_bytes(b"b")
    items = list(list_inputs([str(tmp_path / n) for n in ("x.jpg", ".h.png", "bare.jpg")]))
    assert items == [
        InputItem(f"{tmp_path}/x.jpg", "file", f"{tmp_path}/x.txt", f"{tmp_path}/x.json",
                  f"{tmp_path}/x.zh.txt"),
        InputItem(f"{tmp_path}/.h.png", "file", f"{tmp_path}/.h.json", f"{tmp_path}/.h.json"),
        InputItem(f"{tmp_path}/bare.jpg", "file"),
    ]  # fmt: skip
    # A caption file named as an INPUT is an input of its own, as before.
    assert list(list_inputs([str(tmp_path / "x.txt")])) == [InputItem(f"{tmp_path}/x.txt", "file")]


def test_listing_brace_patterns(tmp_path):
    for i in range(3):
        _tar(tmp_path / f"s-{i:03d}.tar", [("k.jpg", b"k")])
    items = list(list_inputs([str(tmp_path / "s-{000..001}.tar")]))
    assert [i.uri.rsplit("/", 1)[-1] for i in items] == ["s-000.tar", "s-001.tar"]


def test_file_reader_reads_bytes_digest_captions_and_survives_bad_paths(tmp_path):
    (tmp_path / "x.jpg").write_bytes(b"pixels")
    (tmp_path / "x.txt").write_text("  a caption \n")
    (tmp_path / "y.jpg").write_bytes(b"more")
    (tmp_path / "y.json").write_text(json.dumps({"caption": "en", "caption_zh": "中文"}))
    (tmp_path / "big.jpg").write_bytes(b"0" * 100)
    t = FileReader(max_file_bytes=50)(
        {
            schema.SOURCE: [str(tmp_path / n) for n in ("x.jpg", "y.jpg", "nope.jpg", "big.jpg")],
            "sidecar": [str(tmp_path / "x.txt"), str(tmp_path / "y.json"), None, None],
        }
    )
    rows = t.to_pylist()
    assert rows[0][schema.DATA] == b"pixels"
    assert rows[0][schema.SHA256] == hashlib.sha256(b"pixels").hexdigest()
    assert rows[0][schema.CAPTION_EN] == "a caption"
    assert (rows[1][schema.CAPTION_EN], rows[1][schema.CAPTION_ZH]) == ("en", "中文")
    assert rows[2][schema.REASON] == "unreadable" and "nope.jpg" in rows[2][schema.DETAIL]
    assert rows[3][schema.REASON] == "too_large" and rows[3][schema.DATA] is None


def test_tar_reader_groups_members_keeps_offsets_and_reports_truncation(tmp_path):
    tar = tmp_path / "s.tar"
    _tar(
        tar,
        [
            ("a.jpg", b"AAAA"),
            ("a.txt", b"cap a"),
            ("a.zh.txt", "甲".encode()),
            ("dir/b.png", b"BBBBBB"),
            ("dir/b.json", json.dumps({"caption": "cap b"}).encode()),
        ],
    )
    rows = TarReader()({schema.SOURCE: [str(tar)]}).to_pylist()
    by = {r[schema.SOURCE].split("#")[1]: r for r in rows}
    assert set(by) == {"a.jpg", "dir/b.png"}
    assert by["a.jpg"][schema.CAPTION_EN] == "cap a" and by["a.jpg"][schema.CAPTION_ZH] == "甲"
    assert by["dir/b.png"][schema.CAPTION_EN] == "cap b"
    for r in rows:  # the offset lets the writer re-read exactly these bytes later
        assert (
            read_bytes(r[schema.SOURCE], r[schema.TAR_OFFSET], r[schema.SIZE_BYTES])
            == r[schema.DATA]
        )

    for n in (1100, 1024 + 512 + 3):  # inside the second header; inside its data
        cut = tmp_path / f"cut{n}.tar"
        cut.write_bytes(tar.read_bytes()[:n])
        rows = TarReader()({schema.SOURCE: [str(cut)]}).to_pylist()
        assert any(r[schema.REASON] == "unreadable" for r in rows), n
        assert all(r[schema.SOURCE].startswith(str(cut)) for r in rows)
        assert any(r[schema.SOURCE].endswith("#a.jpg") and r[schema.STATUS] is None for r in rows)

    # No member vanishes: no extension, a hidden name, two images whose extensions differ in
    # case, and samples with only metadata or only a caption each get a row.
    odd = tmp_path / "odd.tar"
    _tar(odd, [("noext", b"N"), (".hidden.jpg", b"H"), ("x.JPG", b"X1"), ("x.jpg", b"X2"),
               ("x.txt", b"cap x"), ("j.json", b"{}"), ("t.txt", b"lonely caption")])
    rows = {r[schema.SOURCE].split("#")[1]: r for r in TarReader()({schema.SOURCE: [str(odd)]})
            .to_pylist()}
    assert set(rows) == {"noext", ".hidden.jpg", "x.JPG", "x.jpg", "j", "t"}
    assert [rows[n][schema.DATA] for n in ("noext", ".hidden.jpg", "x.JPG", "x.jpg")] == [
        b"N", b"H", b"X1", b"X2"]
    assert rows["x.JPG"][schema.CAPTION_EN] == rows["x.jpg"][schema.CAPTION_EN] == "cap x"
    for n, only in (("j", ".json"), ("t", ".txt")):
        assert rows[n][schema.REASON] == "unsupported_format" and only in rows[n][schema.DETAIL]

    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"not a tar at all" * 10)
    rows = TarReader()({schema.SOURCE: [str(bad)]}).to_pylist()
    assert len(rows) == 1 and rows[0][schema.REASON] == "decode_error"  # read whole: no tar
    # 0 bytes is an empty file, as an image of 0 bytes is, not a read to try again
    bad.write_bytes(b"")
    (row,) = TarReader()({schema.SOURCE: [str(bad)]}).to_pylist()
    assert (row[schema.REASON], row[schema.DETAIL]) == ("decode_error", "empty file (0 bytes)")


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    layout=st.lists(st.integers(0, 3), min_size=0, max_size=30),
    limit=st.integers(0, 20),
    single_files=st.integers(0, 3),
)
def test_few_local_files_counts_nested_folders_up_to_the_limit(
    tmp_path_factory, layout, limit, single_files
):
    """`few_local_files` is `total files <= limit` for local files and folders (nested ones
    included), and False for lists, tars and remote inputs whatever they hold."""
    root = tmp_path_factory.mktemp("few")
    folder = root / "in"
    folder.mkdir()
    for i, depth in enumerate(layout):  # file i at nesting depth `depth`
        d = folder.joinpath(*[f"d{k}" for k in range(depth)])
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}.jpg").write_bytes(b"x")
    files = []
    for i in range(single_files):
        (root / f"single{i}.jpg").write_bytes(b"x")
        files.append(InputSpec(str(root / f"single{i}.jpg"), "file"))
    specs = [InputSpec(str(folder), "folder"), *files]
    assert few_local_files(specs, limit) == (len(layout) + single_files <= limit)
    for other in (InputSpec("s3://bucket/x", "folder"), InputSpec(str(root / "a.tar"), "tar")):
        assert few_local_files([*specs, other], 10**6) is False


def test_metadata_sidecars_travel_verbatim_next_to_the_caption(tmp_path):
    """img2dataset's folder layout: `<stem>.jpg`, `.txt` (caption) and `.json` (URL, licence).
    The caption comes from the `.txt`; the JSON's text is `source_meta`, exactly as crawled."""
    meta = '{"url": "https://example.com/a.jpg", "license": "CC-BY-4.0", "width": 5120}'
    (tmp_path / "a.jpg").write_bytes(b"a")
    (tmp_path / "a.txt").write_text("the caption")
    (tmp_path / "a.json").write_text(meta + "\n")
    (tmp_path / "b.jpg").write_bytes(b"b")
    (tmp_path / "b.json").write_text('{"caption": "from json", "url": "u"}')
    (tmp_path / "c.jpg").write_bytes(b"c")
    (tmp_path / "c.json").write_text("[1, 2]")  # not an object: no metadata, no failure
    (tmp_path / "d.jpg").write_bytes(b"d")
    (tmp_path / "d.json").write_bytes(b'{"caption": "x", "pad": "' + b"0" * 70_000 + b'"}')
    (tmp_path / "e.jpg").write_bytes(b"e")
    # A `.txt` caption with a JSON that also holds captions: the `.txt` is the English one,
    # an empty `.txt` says nothing, the JSON's Chinese caption stays; marks are dropped.
    (tmp_path / "f.jpg").write_bytes(b"f")
    (tmp_path / "f.txt").write_bytes("\ufeffwith a mark".encode())
    (tmp_path / "f.json").write_text('{"caption": "json en", "caption_zh": "中文"}')
    (tmp_path / "g.jpg").write_bytes(b"g")
    (tmp_path / "g.txt").write_text("  \n")
    (tmp_path / "g.json").write_text('{"caption": "json en", "caption_zh": "中文"}')
    (tmp_path / "h.jpg").write_bytes(b"h")
    (tmp_path / "h.txt").write_bytes("utf-16 caption".encode("utf-16"))
    (tmp_path / "i.jpg").write_bytes(b"i")
    (tmp_path / "i.txt").write_bytes("caf\xe9".encode("latin-1"))  # not UTF-8: no guess
    # `<stem>.zh.txt` is the Chinese caption, as in tars; one without an image is an input.
    (tmp_path / "j.jpg").write_bytes(b"j")
    (tmp_path / "j.txt").write_text("english")
    (tmp_path / "j.zh.txt").write_text("中文说明")
    (tmp_path / "K.JPG").write_bytes(b"k")
    (tmp_path / "K.ZH.TXT").write_text("只有中文")
    (tmp_path / "stray.zh.txt").write_text("孤")
    items = {i.uri.rsplit("/", 1)[-1]: i for i in list_inputs([str(tmp_path)])}
    assert set(items) == {f"{c}.jpg" for c in "abcdefghij"} | {"K.JPG", "stray.zh.txt"}
    assert items["a.jpg"].sidecar.endswith("a.txt") and items["a.jpg"].meta.endswith("a.json")
    assert items["e.jpg"].meta is None
    names = sorted(items)
    t = FileReader()(
        pa.table(
            {
                schema.SOURCE: [items[n].uri for n in names],
                SIDECAR: [items[n].sidecar for n in names],
                META: [items[n].meta for n in names],
                SIDECAR_ZH: [items[n].sidecar_zh for n in names],
            }
        )
    )
    rows = {n: r for n, r in zip(names, t.to_pylist(), strict=True)}
    assert (rows["j.jpg"][schema.CAPTION_EN], rows["j.jpg"][schema.CAPTION_ZH]) == (
        "english", "中文说明")
    assert (rows["K.JPG"][schema.CAPTION_EN], rows["K.JPG"][schema.CAPTION_ZH]) == (
        None, "只有中文")
    assert rows["a.jpg"][schema.CAPTION_EN] == "the caption"
    assert rows["a.jpg"][schema.SOURCE_META] == meta
    assert rows["b.jpg"][schema.CAPTION_EN] == "from json"
    assert json.loads(rows["b.jpg"][schema.SOURCE_META]) == {"caption": "from json", "url": "u"}
    assert rows["c.jpg"][schema.SOURCE_META] is None
    assert rows["d.jpg"][schema.SOURCE_META] is None  # over META_MAX_BYTES
    assert rows["d.jpg"][schema.CAPTION_EN] == "x"  # ... its caption still read
    assert rows["e.jpg"][schema.SOURCE_META] is None
    assert (rows["f.jpg"][schema.CAPTION_EN], rows["f.jpg"][schema.CAPTION_ZH]) == (
        "with a mark", "中文")
    assert (rows["g.jpg"][schema.CAPTION_EN], rows["g.jpg"][schema.CAPTION_ZH]) == (
        "json en", "中文")
    assert rows["h.jpg"][schema.CAPTION_EN] == "utf-16 caption"
    assert rows["i.jpg"][schema.CAPTION_EN] is None
    assert all(r[schema.STATUS] is None for r in rows.values())  # no image lost over metadata


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=60, deadline=None)
@given(meta=st.dictionaries(st.text(), _JSON, max_size=6), raw=st.binary(max_size=200))
def test_source_meta_keeps_json_objects_and_nothing_else(meta, raw):
    """Any JSON object under the cap reads back equal; any other bytes give None, never raise."""
    text = json.dumps(meta, ensure_ascii=False)
    assert json.loads(source_meta(text.encode())) == meta
    got = source_meta(raw)
    assert got is None or isinstance(json.loads(got), dict)


def test_a_blank_json_caption_is_no_caption():
    """A JSON sidecar's caption of spaces was kept as the sample's caption: no model caption,
    a `.txt` of spaces in the shard; a `.txt` sidecar's text was already stripped."""
    from curation.io.readers import json_sidecar

    raw = '{"caption": "  ", "caption_zh": " 湖 \\n"}'.encode()
    assert json_sidecar(raw)[:2] == (None, "湖")
    assert json_sidecar(b'{"caption_en": "\\ta lake\\n"}')[0] == "a lake"


def test_tar_json_members_become_source_meta(tmp_path):
    meta = b'{"url": "https://example.com/k.jpg", "caption": "k cap"}'
    _tar(tmp_path / "s.tar", [("k.jpg", b"k"), ("k.json", meta), ("m.jpg", b"m"), ("m.json", b"{")])
    rows = {r[schema.SOURCE].rsplit("#", 1)[-1]: r for r in TarReader()(
        pa.table({schema.SOURCE: [str(tmp_path / "s.tar")]})).to_pylist()}  # fmt: skip
    assert rows["k.jpg"][schema.SOURCE_META] == meta.decode()
    assert rows["k.jpg"][schema.CAPTION_EN] == "k cap"
    assert rows["m.jpg"][schema.SOURCE_META] is None


def test_an_image_named_tar_is_judged_by_its_bytes(tmp_path):
    """A JPEG saved as `photo.tar` was `unreadable` ("cannot read tar: invalid header"); a
    file that is neither a tar nor an image is a `decode_error` (it was `unreadable`, read
    again by every rerun), while a tar cut short stays `unreadable` (a copy again mends it)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), "teal").save(buf, "JPEG")
    jpeg = tmp_path / "photo.tar"
    jpeg.write_bytes(buf.getvalue())
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"\x07not a tar, not an image" * 40)
    (row,) = TarReader()({schema.SOURCE: [str(jpeg)]}).to_pylist()
    assert row[schema.SOURCE] == str(jpeg) and row[schema.STATUS] is None
    assert row[schema.DATA] == buf.getvalue()
    assert row[schema.SHA256] == hashlib.sha256(buf.getvalue()).hexdigest()
    assert read_bytes(row[schema.SOURCE], row[schema.TAR_OFFSET], row[schema.SIZE_BYTES]) == (
        buf.getvalue()
    )
    (row,) = TarReader()({schema.SOURCE: [str(junk)]}).to_pylist()
    assert row[schema.REASON] == "decode_error", row
    assert row[schema.DETAIL] == "not a tar (nor an image): ReadError: invalid header"
    cut = tmp_path / "cut.tar"
    _tar(cut, [("a.jpg", buf.getvalue())])
    cut.write_bytes(cut.read_bytes()[:600])  # the header whole, the member's bytes not
    rows = TarReader()({schema.SOURCE: [str(cut)]}).to_pylist()
    assert {r[schema.REASON] for r in rows} == {"unreadable"}, rows  # the member and the rest


@given(encoding=st.sampled_from(["utf-8-sig", "utf-16", "utf-16-le", "utf-8"]),
       newline=st.sampled_from(["\n", "\r\n"]))
@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_a_list_written_by_windows_tools_names_its_files(tmp_path, encoding, newline):
    """A list saved with a byte-order mark (Notepad's UTF-8, PowerShell's UTF-16) made its
    first file '\\ufeffa.jpg': an `unreadable` row for a file that exists."""
    lst = tmp_path / f"{encoding}.lst"
    text = newline.join(["a.jpg", "sub/b.jpg", "# comment", ""])
    if encoding == "utf-16-le":  # with its mark, as PowerShell writes it
        lst.write_bytes(b"\xff\xfe" + text.encode("utf-16-le"))
    else:
        lst.write_bytes(text.encode(encoding))
    listed = [i.uri for i in list_inputs([str(lst)])]
    assert listed == [str(tmp_path / "a.jpg"), str(tmp_path / "sub" / "b.jpg")]


@given(name=st.sampled_from(["g::h", "a::b::c", "x#1", "q?", "s%20t"]))  # (braces: patterns)
@settings(
    max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_local_names_with_url_syntax_are_read_as_named(tmp_path, name):
    """fsspec reads `::` as URL chaining: `g::h.jpg` was an `unreadable` row ("No such
    file") in a folder, a list or a tar's name, and as an INPUT it did not exist."""
    import tempfile

    folder = Path(tempfile.mkdtemp(dir=tmp_path))
    image, tar = folder / f"{name}.jpg", folder / f"{name}.tar"
    image.write_bytes(b"\xff\xd8 image bytes")
    _tar(tar, [("m.jpg", b"member bytes")])
    lst = folder / "list.lst"
    lst.write_text(f"{image.name}\n")
    for inputs in ([str(folder)], [str(image)], [str(lst)]):
        listed = {i.uri: i.kind for i in list_inputs(inputs)}
        assert listed.get(str(image)) == "file", (inputs, listed)
    rows = FileReader()({schema.SOURCE: [str(image)], SIDECAR: [None]}).to_pylist()
    assert rows[0][schema.STATUS] is None, rows[0][schema.DETAIL]
    assert read_bytes(str(image)) == rows[0][schema.DATA] == image.read_bytes()
    (member,) = TarReader()({schema.SOURCE: [str(tar)]}).to_pylist()
    assert member[schema.DATA] == b"member bytes"
    assert read_bytes(member[schema.SOURCE], member[schema.TAR_OFFSET], 12) == b"member bytes"


def _read_in_thread(reader: FileReader, batch: dict) -> list[dict]:
    """The reader's rows, or a failure when it is still reading after 10 s (the blocked
    thread is a daemon, left waiting on its pipe)."""
    out: list = []
    worker = threading.Thread(target=lambda: out.append(reader(batch).to_pylist()), daemon=True)
    worker.start()
    worker.join(10)
    assert not worker.is_alive(), "the reader blocked on a named pipe"
    return out[0]


def test_pipes_and_devices_are_unreadable_rows_never_read(tmp_path):
    """A named pipe (a read waits for ever for a writer) and a link to `/dev/zero` (a read
    never ends; its size is 0, so the byte cap did not stop it) are rows, not a hung job."""
    os.mkfifo(tmp_path / "pipe.jpg")
    os.mkfifo(tmp_path / "photo.txt")  # a sidecar that is a pipe
    (tmp_path / "photo.jpg").write_bytes(b"pixels")
    (tmp_path / "zero.jpg").symlink_to("/dev/zero")
    items = list(list_inputs([str(tmp_path)]))
    batch = {
        schema.SOURCE: [i.uri for i in items],
        SIDECAR: [i.sidecar for i in items],
    }
    rows = _read_in_thread(FileReader(max_file_bytes=1 << 20), batch)
    by = {Path(r[schema.SOURCE]).name: r for r in rows}
    assert set(by) == {"pipe.jpg", "photo.jpg", "zero.jpg"}
    assert by["pipe.jpg"][schema.REASON] == "unreadable"
    assert "named pipe" in by["pipe.jpg"][schema.DETAIL]
    assert by["zero.jpg"][schema.REASON] == "unreadable"
    assert "character device" in by["zero.jpg"][schema.DETAIL]
    assert by["photo.jpg"][schema.DATA] == b"pixels"  # its pipe of a caption is no caption
    assert by["photo.jpg"][schema.CAPTION_EN] is None


def test_a_file_that_grows_while_read_stops_at_the_byte_cap(tmp_path, monkeypatch):
    """The cap holds for the bytes read, not only for the size looked up before the read."""
    import curation.io.readers as readers

    path = tmp_path / "growing.jpg"
    path.write_bytes(b"x" * 10)
    real_open = readers.open_input

    def open_after_growth(uri: str):
        path.write_bytes(b"x" * 1000)  # rewritten between the size check and the read
        return real_open(uri)

    monkeypatch.setattr(readers, "open_input", open_after_growth)
    row = FileReader(max_file_bytes=100)({schema.SOURCE: [str(path)]}).to_pylist()[0]
    assert row[schema.REASON] == "too_large" and row[schema.DATA] is None


def _as_a_user(code: str, *args: str) -> subprocess.CompletedProcess:
    """Run Python `code` as a user that file permissions apply to: as root, in a new user
    namespace (where it is `nobody`); skipped where none can be made."""
    cmd = [sys.executable, "-c", code, *args]
    if os.geteuid() == 0:
        if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "-U", "true"], capture_output=True
        ).returncode:
            pytest.skip("root, and no user namespace to drop its permission override")
        cmd = ["unshare", "-U", *cmd]
    root = Path(__file__).resolve().parents[3]
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)


def test_a_folder_that_cannot_be_listed_is_an_unreadable_row():
    """A folder without read permission hides its files: it is one `unreadable` row, not
    nothing (os.walk skipped it without a word, and its files vanished from the job)."""
    code = (
        "import json, sys\n"
        "from curation.io.listing import list_inputs\n"
        "from curation.io.readers import FileReader\n"
        "items = list(list_inputs(sys.argv[1:]))\n"
        "rows = FileReader()({'source': [i.uri for i in items]}).to_pylist()\n"
        "print(json.dumps([[r['source'], r['status'], r['reason'], r['detail']] for r in rows]))"
    )
    with tempfile.TemporaryDirectory() as tmp:  # not pytest's tmp_path: 0700, closed to others
        top = Path(tmp) / "in"
        (top / "locked" / "inner").mkdir(parents=True)
        (top / "locked" / "inner" / "a.jpg").write_bytes(b"a")
        (top / "ok.jpg").write_bytes(b"ok")
        (top / "shut").mkdir()
        (top / "shut" / "b.jpg").write_bytes(b"b")
        os.chmod(tmp, 0o755)
        os.chmod(top / "locked", 0)
        os.chmod(top / "shut", 0)
        try:
            run = _as_a_user(code, str(top), str(top / "shut"))  # a folder INPUT of its own too
        finally:
            os.chmod(top / "locked", 0o755)
            os.chmod(top / "shut", 0o755)
    assert run.returncode == 0, run.stderr
    rows = {Path(s).name: (st, r, d) for s, st, r, d in json.loads(run.stdout)}
    assert rows["ok.jpg"][1] is None  # read
    for name in ("locked", "shut"):
        status, reason, detail = rows.pop(name)
        assert (status, reason) == ("rejected", "unreadable") and "Permission" in detail
    assert set(rows) == {"ok.jpg"}


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    names=st.sets(
        st.tuples(
            st.sampled_from(["a", "A", "b", "a.zh", "x y"]),
            st.sampled_from(
                ["jpg", "JPG", "png", "txt", "TXT", "zh.txt", "json", "tar", "TAR", ""]
            ),
        ),
        min_size=1,
        max_size=6,
    )
)
@example(names={("a", "tar"), ("a", "txt"), ("a", "zh.txt")})
def test_every_file_of_a_folder_is_an_input_or_an_inputs_sidecar(tmp_path_factory, names):
    """No file is lost by the pairing: each is listed, or is the caption, Chinese caption or
    metadata of a listed image (only stray `.json` metadata is not an input, as documented).
    A `.txt` beside a tar of its stem was taken for a sidecar that no tar reads: no row."""
    folder = tmp_path_factory.mktemp("pairs")
    files: set[str] = set()
    for stem, ext in names:
        name = f"{stem}.{ext}" if ext else stem
        if name.lower() not in {f.lower() for f in files}:  # one case-insensitive spelling
            (folder / name).write_bytes(b"x")
            files.add(name)
    covered = set()
    for item in list_inputs([str(folder)]):
        covered.add(Path(item.uri).name)
        if item.kind == "file":
            covered |= {Path(s).name for s in (item.sidecar, item.meta, item.sidecar_zh) if s}
    lost = {f for f in files - covered if not f.lower().endswith(".json")}
    assert not lost, sorted(files)


def test_every_tar_member_but_folders_is_a_row_links_included(tmp_path):
    """Links, pipes and devices in a tar were skipped without a row. A hard link (how `tar`
    stores a hard-linked file's second name) is the earlier member's bytes, which the shard
    writer can read again at that member's offset; a symbolic link is never followed."""
    tar = tmp_path / "links.tar"
    with tarfile.open(tar, "w") as tf:
        for name, data in (("a.jpg", b"AAAA"), ("a.txt", b"cap a")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, kind, target in (
            ("dir", tarfile.DIRTYPE, ""),
            ("hard.jpg", tarfile.LNKTYPE, "a.jpg"),
            ("lost.jpg", tarfile.LNKTYPE, "not-in-the-tar.jpg"),
            ("sym.jpg", tarfile.SYMTYPE, "/etc/passwd"),
            ("pipe.png", tarfile.FIFOTYPE, ""),
            ("dev", tarfile.CHRTYPE, ""),
        ):
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, target
            tf.addfile(info)
    rows = {r[schema.SOURCE].split("#")[1]: r for r in TarReader()({schema.SOURCE: [str(tar)]})
            .to_pylist()}  # fmt: skip
    assert set(rows) == {"a.jpg", "hard.jpg", "lost.jpg", "sym.jpg", "pipe.png", "dev"}
    hard = rows.pop("hard.jpg")
    assert hard[schema.DATA] == b"AAAA" and hard[schema.REASON] is None
    assert read_bytes(f"{tar}#hard.jpg", hard[schema.TAR_OFFSET], hard[schema.SIZE_BYTES]) == (
        b"AAAA")  # fmt: skip
    assert rows.pop("a.jpg")[schema.CAPTION_EN] == "cap a"
    for name, words in (("lost.jpg", "hard link"), ("sym.jpg", "symbolic link"),
                        ("pipe.png", "named pipe"), ("dev", "device")):  # fmt: skip
        assert rows[name][schema.REASON] == "unsupported_format", name
        assert words in rows[name][schema.DETAIL] and rows[name][schema.DATA] is None


def test_few_local_files_does_not_follow_linked_folders(tmp_path):
    """Two links to a folder inside it: the look followed them, branching twice per level
    down to the kernel's link limit (2^40 folders; with no file to stop it, the job never
    started), and counted files that the listing does not list."""
    folders = [tmp_path / "empty", tmp_path / "one"]
    for folder in folders:
        folder.mkdir()
        (folder / "a").symlink_to(folder, target_is_directory=True)
        (folder / "b").symlink_to(folder, target_is_directory=True)
    (tmp_path / "one" / "x.jpg").write_bytes(b"x")
    code = (
        "import sys\n"
        "from curation.io.listing import few_local_files, plan_inputs\n"
        "for f in sys.argv[1:]: print(few_local_files(plan_inputs([f]), 1))"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[3])}
    try:
        run = subprocess.run([sys.executable, "-c", code, *map(str, folders)],
                             capture_output=True, text=True, env=env, timeout=20)  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail("few_local_files followed the folder's links to itself")
    assert run.stdout.split() == ["True", "True"], run.stderr  # 0 and 1 files, as listed


def test_a_folder_nested_a_thousand_levels_deep_is_listed(tmp_path):
    """A legal path (under 4096 bytes) 1,200 folders deep: `os.walk` recursed once per level
    and the listing failed the job with a RecursionError."""
    folder = tmp_path / "deep"
    path = str(folder)
    os.mkdir(path)
    for _ in range(1200):
        path += "/a"
        os.mkdir(path)
    Path(path, "x.jpg").write_bytes(b"x")
    Path(folder, "top.jpg").write_bytes(b"t")
    try:
        listed = sorted(i.uri for i in list_inputs([str(folder)]))
    finally:  # removed here, bottom up: pytest's recursive clean-up of old tmp folders fails
        os.unlink(f"{path}/x.jpg")
        while path != str(folder):
            os.rmdir(path)
            path = os.path.dirname(path)
    assert listed == sorted([f"{path}/a{'/a' * 1199}/x.jpg", f"{folder}/top.jpg"])


def test_a_sidecar_over_the_cap_is_no_caption_and_is_not_read_whole(tmp_path):
    """A caption or metadata file of more than `SIDECAR_MAX_BYTES` beside an image (a dump,
    not a caption) was read whole into the worker; it is no caption, and the image is read."""
    from curation.io.readers import SIDECAR_MAX_BYTES

    (tmp_path / "x.jpg").write_bytes(b"pixels")
    (tmp_path / "x.txt").write_bytes(b"a" * (SIDECAR_MAX_BYTES + 1))
    (tmp_path / "x.json").write_bytes(b'{"caption": "' + b"b" * SIDECAR_MAX_BYTES + b'"}')
    (tmp_path / "y.jpg").write_bytes(b"more")
    (tmp_path / "y.txt").write_bytes(b"c" * SIDECAR_MAX_BYTES)  # at the cap: a caption
    items = list(list_inputs([str(tmp_path)]))
    rows = FileReader()({
        schema.SOURCE: [i.uri for i in items],
        SIDECAR: [i.sidecar for i in items],
        META: [i.meta for i in items],
    }).to_pylist()  # fmt: skip
    by = {Path(r[schema.SOURCE]).name: r for r in rows}
    assert by["x.jpg"][schema.DATA] == b"pixels" and by["x.jpg"][schema.CAPTION_EN] is None
    assert by["x.jpg"][schema.SOURCE_META] is None
    assert len(by["y.jpg"][schema.CAPTION_EN]) == SIDECAR_MAX_BYTES


def _write_layout(path: Path, samples: list[tuple[int, bool, bool]]) -> int:
    """A tar of `samples` (image size, with a caption, plus a hard link to it); its bytes."""
    total = 0
    with tarfile.open(path, "w") as tf:
        for i, (size, caption, link) in enumerate(samples):
            members = [(f"s{i:03d}.jpg", bytes([i % 251]) * size)]
            if caption:
                members.append((f"s{i:03d}.txt", f"caption {i}".encode()))
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
                total += len(data)
            if link:  # another sample's name for the same bytes, stored later
                info = tarfile.TarInfo(f"l{i:03d}.jpg")
                info.type, info.linkname = tarfile.LNKTYPE, f"s{i:03d}.jpg"
                tf.addfile(info)
                total += size
    return total


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    samples=st.lists(
        st.tuples(st.integers(0, 3000), st.booleans(), st.booleans()), min_size=0, max_size=12
    ),
    block=st.integers(1, 20_000),
    done=st.sets(st.integers(0, 11), max_size=4),
)
def test_tar_rows_leave_in_bounded_blocks_and_are_the_same_rows(tmp_path, samples, block, done):
    """A tar was read whole into one block, so a worker held the whole tar (WebDataset shards
    are often GBs). Its rows now leave in blocks of about `max_block_bytes` of member bytes:
    the same rows, captions and offsets as one block, each block bounded by the limit plus
    one sample, and `done_members` left out whichever block they fall in."""
    tar = Path(tempfile.mkdtemp(dir=tmp_path)) / "s.tar"
    _write_layout(tar, samples)
    skip = [f"{tar}#s{i:03d}.jpg" for i in sorted(done)]
    batch = {schema.SOURCE: [str(tar)], "done_members": [skip]}
    whole = TarReader(max_block_bytes=10**9)(batch).to_pylist()
    reader = TarReader(max_block_bytes=block)
    blocks = [b.to_pylist() for b in reader.blocks(batch)]
    streamed = [r for b in blocks for r in b]
    ignore = {schema.STAGE_SECONDS}
    assert [{k: v for k, v in r.items() if k not in ignore} for r in streamed] == [
        {k: v for k, v in r.items() if k not in ignore} for r in whole
    ]
    assert not {r[schema.SOURCE] for r in streamed} & set(skip)
    largest = max([s * (2 if link else 1) + 20 for s, _, link in samples], default=0)
    for b in blocks:
        assert sum(r[schema.SIZE_BYTES] or 0 for r in b) < block + largest
    for r in streamed:  # every offset reads its bytes again, hard links included
        if r[schema.DATA] is not None:
            assert read_bytes(r[schema.SOURCE], r[schema.TAR_OFFSET], r[schema.SIZE_BYTES]) == (
                r[schema.DATA])  # fmt: skip
            name = r[schema.SOURCE].rsplit("#", 1)[1]
            captioned = name.startswith("s") and samples[int(name[1:4])][1]
            assert r[schema.CAPTION_EN] == (f"caption {int(name[1:4])}" if captioned else None)
    expected = sum(1 + link for _, _, link in samples) - len(
        [i for i in done if i < len(samples)]
    )
    assert len(streamed) == max(expected, 0 if samples else 1)
    if sum(s for s, _, _ in samples) > 3 * block and len(samples) > 3 and not done:
        assert len(blocks) > 1


def _rows_by_name(tar: Path, **kwargs) -> dict[str, dict]:
    rows = TarReader(**kwargs)({schema.SOURCE: [str(tar)]}).to_pylist()
    by = {r[schema.SOURCE].split(".tar#", 1)[1]: r for r in rows}
    assert len(by) == len(rows), [r[schema.SOURCE] for r in rows]
    return by


def test_a_name_stored_again_in_a_tar_is_a_sample_of_its_own(tmp_path):
    """`tar -r` appends a newer copy under the same name. Both copies had one source, so the
    job kept one row and blamed an interrupted run; a third copy ended the read
    (StopIteration), losing every later member; and the first copy's caption went with the
    second copy. As WebDataset reads it, a name stored again starts a new sample."""
    tar = tmp_path / "dup.tar"
    _tar(tar, [("dup.jpg", b"first"), ("dup.txt", b"beside the first"), ("dup.jpg", b"second"),
               ("k.jpg", b"k1"), ("k.jpg", b"k2"), ("k.jpg", b"k3"),
               ("after.jpg", b"after"), ("after.txt", b"after's caption")])  # fmt: skip
    by = _rows_by_name(tar)
    assert {n: (r[schema.DATA], r[schema.CAPTION_EN]) for n, r in by.items()} == {
        "dup.jpg": (b"first", "beside the first"), "dup.jpg#2": (b"second", None),
        "k.jpg": (b"k1", None), "k.jpg#2": (b"k2", None), "k.jpg#3": (b"k3", None),
        "after.jpg": (b"after", "after's caption")}  # fmt: skip
    for r in by.values():
        assert read_bytes(r[schema.SOURCE], r[schema.TAR_OFFSET], r[schema.SIZE_BYTES]) == (
            r[schema.DATA])  # fmt: skip
    # a rerun skips what it analysed by source: the first copy only
    done = {schema.SOURCE: [str(tar)], "done_members": [[f"{tar}#dup.jpg", f"{tar}#k.jpg#2"]]}
    left = {r[schema.SOURCE].split("#", 1)[1] for r in TarReader()(done).to_pylist()}
    assert left == {"dup.jpg#2", "k.jpg", "k.jpg#3", "after.jpg"}


_NAMES = ["a.jpg", "a.txt", "a.JPG", "b.png", "b.json", "a.v2.jpg", "a.v2.txt", "c.cls", "noext"]


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(names=st.lists(st.sampled_from(_NAMES), max_size=14), block=st.integers(1, 64))
def test_every_image_member_of_a_tar_is_one_row_with_its_own_bytes(tmp_path, names, block):
    """Whatever the names repeat and however the rows are cut into blocks, each member that is
    no caption, metadata or label is exactly one row, whose offset reads its bytes again."""
    tar = Path(tempfile.mkdtemp(dir=tmp_path)) / "t.tar"
    members = [(n, f"{i}:{n}".encode()) for i, n in enumerate(names)]
    _tar(tar, members)
    rows = [r for b in TarReader(max_block_bytes=block).blocks({schema.SOURCE: [str(tar)]})
            for r in b.to_pylist()]  # fmt: skip
    sources = [r[schema.SOURCE] for r in rows]
    assert len(sources) == len(set(sources))
    images = [d for n, d in members if not n.endswith((".txt", ".json", ".cls"))]
    got = [r[schema.DATA] for r in rows if r[schema.DATA] is not None]
    assert sorted(got) == sorted(images)
    for r in rows:
        if r[schema.DATA] is not None:
            assert read_bytes(r[schema.SOURCE], r[schema.TAR_OFFSET], r[schema.SIZE_BYTES]) == (
                r[schema.DATA])  # fmt: skip
        else:  # only captions, metadata or labels: one row that says so
            assert r[schema.REASON] == "unsupported_format", r
    if not names:
        assert [r[schema.DETAIL] for r in rows] == ["tar holds no sample"]


def test_captions_pair_with_dotted_names_and_labels_are_no_images(tmp_path):
    """WebDataset's key ends at the first dot: `photo.2023.v2.txt` was no caption of
    `photo.2023.v2.jpg` (a folder pairs them) but a rejected input of its own; a class label
    (`x.cls`) was analysed as an image and rejected, once per sample."""
    tar = tmp_path / "d.tar"
    _tar(tar, [("photo.2023.v2.jpg", b"P"), ("photo.2023.v2.txt", b"the photo"),
               ("photo.2023.v2.json", json.dumps({"url": "u"}).encode()),
               ("x.jpg", b"X"), ("x.depth.png", b"D"), ("x.txt", b"x itself"),
               ("x.depth.txt", b"x's depth"), ("x.cls", b"7"),
               ("y.jpg", b"Y"), ("y.jpg.txt", b"y, named with its extension"),
               ("z.cls", b"3"), ("z.notes.txt", b"notes of nothing")])  # fmt: skip
    by = _rows_by_name(tar)
    assert {n: r[schema.CAPTION_EN] for n, r in by.items() if r[schema.DATA]} == {
        "photo.2023.v2.jpg": "the photo", "x.jpg": "x itself", "x.depth.png": "x's depth",
        "y.jpg": "y, named with its extension"}  # fmt: skip
    assert json.loads(by["photo.2023.v2.jpg"][schema.SOURCE_META]) == {"url": "u"}
    assert by["z"][schema.REASON] == "unsupported_format"
    assert by["z"][schema.DETAIL] == "sample has no image member, only .cls, .notes.txt"
    assert len(by) == 5


def test_a_tar_is_whole_only_with_its_end_block_and_a_joined_one_says_so(tmp_path):
    """The end check took a file whose size was no multiple of 512 for a cut one: a whole tar
    with bytes appended (a download tool's) got an `unreadable` row and was read again by
    every rerun, while a tar cut at a member's end passed for whole."""
    tar = tmp_path / "t.tar"
    _tar(tar, [("a.jpg", b"A" * 700), ("b.jpg", b"B" * 10)])
    raw = tar.read_bytes()
    notes = tmp_path / "notes"

    def rows(data: bytes) -> dict[str, dict]:
        tar.write_bytes(data)
        return _rows_by_name(tar, done_folder=str(notes))

    got = rows(raw + b"garbage!" * 10)
    assert set(got) == {"a.jpg", "b.jpg"} and len(list(notes.iterdir())) == 1  # read to its end
    for data in (raw[: 512 + 1024], raw[: 512 + 1024 + 100]):  # cut after a, or in b's header
        got = rows(data)
        assert set(got) == {"a.jpg", "<rest>"}, got
        assert "no end-of-archive block" in got["<rest>"][schema.DETAIL]
    other = tmp_path / "o.tar"
    _tar(other, [("c.jpg", b"C")])
    got = rows(raw + other.read_bytes())  # `cat t.tar o.tar`
    assert set(got) == {"a.jpg", "b.jpg", "<rest>"}
    assert "a second archive starts at byte 10240" in got["<rest>"][schema.DETAIL]


@pytest.mark.parametrize("mode,words", [("w:gz", "gzip"), ("w:bz2", "bzip2"), ("w:xz", "xz")])
def test_a_compressed_tar_is_one_row_that_says_to_decompress_it(tmp_path, mode, words):
    """`r|*` read a compressed `.tar`, but its offsets were into the decompressed stream, so
    the shard writer's re-read by offset found other bytes and the kept samples were lost."""
    tar = tmp_path / "c.tar"
    with tarfile.open(tar, mode) as tf:
        info = tarfile.TarInfo("a.jpg")
        info.size = 4
        tf.addfile(info, io.BytesIO(b"AAAA"))
    (row,) = TarReader()({schema.SOURCE: [str(tar)]}).to_pylist()
    assert row[schema.SOURCE] == str(tar) and row[schema.REASON] == "unsupported_format"
    assert f"{words}-compressed" in row[schema.DETAIL] and "decompress" in row[schema.DETAIL]


_TREE = (
    "in/a.jpg", "in/a.txt", "in/a.zh.txt", "in/.h.jpg", "in/stray.txt", "in/stray.json",
    "in/_SUCCESS", "in/s.tar", "in/sub/b.png", "in/sub/b.json", "in/sub/.c.jpg",
    "in/sub/e.txt", "in/sub/e.zh.txt", "in/sub/deeper/d.jpg", "in/out/shards/x.tar",
    "other/o.jpg",
)  # fmt: skip
_FOLDERS = ("in", "in/sub", "in/sub/deeper", "in/out", "other")


def _overlap_tree(root: Path) -> None:
    """Images, sidecars, hidden and stray files, a tar, an OUT and a list, under `root`."""
    for name in _TREE:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".tar"):
            _tar(root / name, [("k.jpg", b"k")])
        else:
            (root / name).write_bytes(name.encode())
    (root / "in" / "more.lst").write_text("../other/o.jpg\n../other/o.jpg\n./../other/o.jpg\n")


@given(
    picks=st.lists(
        st.tuples(st.sampled_from([n for n in (*_FOLDERS, *_TREE, "in/more.lst")
                                   if not n.startswith("other")]),  # what the list names
                  st.sampled_from(["{}", "{}/", "./{}", "in/../{}", "{}/."])),
        min_size=1, max_size=5,
    )
)  # fmt: skip
@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_overlapping_inputs_list_each_input_once(tmp_path, picks):
    """`curate DIR DIR/sub`, `DIR DIR/x.jpg`, `DIR ./DIR/`: the files of the inner INPUT were
    listed twice (analysed twice). Each is now listed once, and nothing is lost: what the
    INPUTs list together is what each lists alone, a named file that the folder walk skips
    (hidden, a sidecar) included."""
    root = tmp_path / "tree"
    if not root.exists():
        _overlap_tree(root)
    args = []
    for name, spelling in picks:
        if spelling.startswith("{}/") and name not in _FOLDERS:
            spelling = "{}"  # a file has no trailing slash
        args.append(f"{root}/{spelling.format(name)}")
    listed = [i.uri for i in list_inputs(args)]
    assert len(listed) == len(set(listed)), args
    alone = set().union(*({i.uri for i in list_inputs([a])} for a in args))
    assert set(listed) == alone, args


def test_the_covered_inputs_are_named_in_one_note(tmp_path):
    from curation.io.listing import drop_covered_inputs, plan_inputs

    _overlap_tree(tmp_path)
    inp, sub = tmp_path / "in", tmp_path / "in" / "sub"
    (tmp_path / "link").symlink_to(inp, target_is_directory=True)

    def drop(*args: Path | str, out: Path | None = None) -> tuple[list[str], str | None]:
        specs = plan_inputs([str(a) for a in args])
        kept, note = drop_covered_inputs(specs, exclude=str(out) if out else None)
        return [s.uri for s in kept], note

    assert drop(inp, sub) == ([str(inp)], f"{sub} is inside {inp}, listed once")
    assert drop(sub, inp) == ([str(inp)], f"{sub} is inside {inp}, listed once")
    assert drop(inp, inp) == ([str(inp)], f"{inp} is given twice, listed once")
    assert drop(inp, f"{inp}/", tmp_path / "link") == ([str(inp)], (
        f"{inp}/ is the same as {inp}; {tmp_path}/link is the same as {inp}: each listed once"))
    kept, note = drop(inp, sub / "deeper" / "d.jpg", inp / "s.tar", sub / "b.png")
    assert kept == [str(inp)] and note.endswith(": each listed once")
    assert f"{sub}/deeper/d.jpg is inside {inp}; " in note
    # Named files that the walk skips stay INPUTs: hidden, a sidecar, a list, `_SUCCESS`.
    keep = [inp / ".h.jpg", inp / "a.txt", inp / "a.zh.txt", inp / "more.lst", inp / "_SUCCESS"]
    assert drop(inp, *keep) == ([str(inp), *map(str, keep)], None)
    # A stray caption is listed by the walk: covered.
    assert drop(inp, inp / "stray.txt")[0] == [str(inp)]
    # Under OUT, which the folder walk skips, an INPUT is its own.
    shards = inp / "out" / "shards"
    assert drop(inp, shards, out=inp / "out") == ([str(inp), str(shards)], None)
    assert drop(inp, shards)[0] == [str(inp)]
    # Many covered INPUTs (a brace pattern): three are named, the others counted.
    many = [inp / n for n in ("a.jpg", "s.tar", "stray.txt", "sub/b.png", "sub/deeper/d.jpg")]
    kept, note = drop(inp, *many)
    assert kept == [str(inp)] and note.count(" is inside ") == 3
    assert note.endswith(" (and 2 more INPUTs that others cover): each listed once")
    # Nothing in common: no note.
    assert drop(sub, tmp_path / "other") == ([str(sub), str(tmp_path / "other")], None)


def test_an_input_under_an_unreadable_folder_stays_its_own(tmp_path, monkeypatch):
    """A folder the walk cannot list becomes one `unreadable` row: a file named below it
    (readable through the folder's search permission) must not be dropped with it."""
    from curation.io import listing

    locked = tmp_path / "in" / "locked"
    locked.mkdir(parents=True)
    (locked / "x.jpg").write_bytes(b"x")
    specs = listing.plan_inputs([str(tmp_path / "in"), str(locked / "x.jpg")])
    assert len(listing.drop_covered_inputs(specs)[0]) == 1
    access = os.access  # as for a user without read permission on it (the tests run as root)
    monkeypatch.setattr(listing.os, "access", lambda p, m: p != str(locked) and access(p, m))
    assert listing.drop_covered_inputs(specs) == (specs, None)


def test_a_list_naming_a_file_twice_lists_it_once(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"a")
    lst = tmp_path / "again.lst"
    lst.write_text(f"a.jpg\n{tmp_path}/a.jpg\n./a.jpg\nb-{{1..2}}.jpg\nb-2.jpg\n\n# a.jpg\n")
    listed = [i.uri for i in list_inputs([str(lst)])]
    assert listed == [str(tmp_path / n) for n in ("a.jpg", "b-1.jpg", "b-2.jpg")]
    # a file:// URI of a UTF-8 path is that path (it was analysed twice, once as a copy of
    # itself); one of a name that is no UTF-8 stays the URI a folder lists it by
    weird = os.fsdecode(b"c\xff.jpg")
    (tmp_path / weird).write_bytes(b"c")
    quoted = quote(str(tmp_path / "100%.jpg"))
    lst.write_text(f"100%.jpg\nfile://{quoted}\n{weird}\n", errors="surrogateescape")
    listed = [i.uri for i in list_inputs([str(lst)])]
    (named,) = list_inputs([str(tmp_path / weird)])
    assert listed == [str(tmp_path / "100%.jpg"), named.uri]
    assert listed[1].startswith("file://")


def test_overlapping_s3_prefixes_are_listed_once(s3_server):
    import boto3
    import fsspec

    from curation.io.listing import drop_covered_inputs, plan_inputs

    s3 = boto3.client("s3")
    where = {"LocationConstraint": "us-west-2"}
    s3.create_bucket(Bucket="overlap", CreateBucketConfiguration=where)
    for name in ("in/a.jpg", "in/sub/b.jpg", "in/sub/.c.jpg", "other/o.jpg"):
        s3.put_object(Bucket="overlap", Key=name, Body=b"x")
    fsspec.filesystem("s3").invalidate_cache()
    args = ["s3://overlap/in", "s3://overlap/in/sub/", "s3://overlap/in/sub/b.jpg",
            "s3://overlap/in/", "s3://overlap/in/sub/.c.jpg", "s3://overlap/other"]
    kept, note = drop_covered_inputs(plan_inputs(args))
    assert [s.uri for s in kept] == [args[0], args[4], args[5]]
    assert note.startswith("s3://overlap/in/sub/ is inside s3://overlap/in; ")
    listed = [i.uri for i in list_inputs(args)]
    assert sorted(listed) == [f"s3://overlap/{n}" for n in
                              ("in/a.jpg", "in/sub/.c.jpg", "in/sub/b.jpg", "other/o.jpg")]


def test_an_s3_key_that_is_also_a_prefix_is_an_input_and_folder_markers_are_not(s3_server):
    """`a.jpg` beside `a.jpg/b.jpg` was taken for a folder: the image had no manifest row and
    its caption became an input; a console's empty "folder" key (`empty/`) was an input."""
    import boto3
    import fsspec

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="keyprefix",
                     CreateBucketConfiguration={"LocationConstraint": "us-west-2"})  # fmt: skip
    objects = {"in/both.jpg": b"both", "in/both.txt": b"a caption",
               "in/both.jpg/inner.jpg": b"inner", "in/empty/": b"", "in/full/": b"",
               "in/full/x.jpg": b"x"}  # fmt: skip
    for key, body in objects.items():
        s3.put_object(Bucket="keyprefix", Key=key, Body=body)
    fsspec.filesystem("s3").invalidate_cache()
    base = "s3://keyprefix/in"
    items = list(list_inputs([base]))
    assert [(i.uri, i.sidecar) for i in items] == [
        (f"{base}/both.jpg", f"{base}/both.txt"), (f"{base}/both.jpg/inner.jpg", None),
        (f"{base}/full/x.jpg", None)]  # fmt: skip
    rows = FileReader()({schema.SOURCE: [i.uri for i in items],
                         SIDECAR: [i.sidecar for i in items]}).to_pylist()  # fmt: skip
    assert [(r[schema.DATA], r[schema.CAPTION_EN]) for r in rows] == [
        (b"both", "a caption"), (b"inner", None), (b"x", None)]
    # Named, the object is the input; with a trailing slash, the prefix is.
    assert plan_inputs([f"{base}/both.jpg"]) == [InputSpec(f"{base}/both.jpg", "file")]
    assert plan_inputs([f"{base}/both.jpg/"]) == [InputSpec(f"{base}/both.jpg/", "folder")]
    assert [i.uri for i in list_inputs([f"{base}/both.jpg/"])] == [f"{base}/both.jpg/inner.jpg"]


@pytest.mark.parametrize("spelling", ["{}/./in", "{}/in/", "{}//in", "{}/in/../in"])
def test_a_folder_spelled_with_dots_pairs_its_sidecars_as_written_plainly(tmp_path, spelling):
    """`curate ./photos` from above, or `DIR/./in`: pathlib dropped the `./` from each image's
    stem but not from its `<stem>.zh.txt`, so the Chinese caption became an input of its own
    (a text-file row) and the image lost it."""
    (tmp_path / "in").mkdir()
    for name in ("a.jpg", "a.txt", "a.zh.txt", "b.png", "b.json"):
        (tmp_path / "in" / name).write_bytes(b"x")

    def listed(inputs: list[str]) -> list[InputItem]:
        return sorted(list_inputs(inputs), key=lambda i: i.uri)  # sources are normalised

    plain = listed([str(tmp_path / "in")])
    assert [Path(i.uri).name for i in plain] == ["a.jpg", "b.png"]
    assert plain[0].sidecar_zh == f"{tmp_path}/in/a.zh.txt"
    assert listed([spelling.format(tmp_path)]) == plain
    named = spelling.format(tmp_path).rstrip("/") + "/a.jpg"
    assert listed([named]) == plain[:1]


def test_a_tar_read_to_its_end_is_not_opened_again_once_all_its_rows_are_done(
    tmp_path, monkeypatch
):
    """A rerun read every tar again to skip the members an earlier run analysed: an
    interrupted job over many GB of S3 tars downloaded all the finished ones again. A tar read
    to its end leaves a note (size, mtime or ETag, rows); a rerun that has analysed that many
    of its rows does not open it. One row missing, a replaced tar, or a tar that ended in
    error: read."""
    tar = tmp_path / "s.tar"
    _tar(tar, [("a.jpg", b"AAAA"), ("a.txt", b"cap"), ("b.png", b"BB"), ("c", b"C")])
    notes = str(tmp_path / "_work" / "tars")
    reader = TarReader(done_folder=notes)
    rows = reader({schema.SOURCE: [str(tar)]}).to_pylist()
    sources = [r[schema.SOURCE] for r in rows]
    assert len(sources) == 3 and len(os.listdir(notes)) == 1

    def read(done: list[str]) -> list[str]:
        out = reader({schema.SOURCE: [str(tar)], "done_members": [done]}).to_pylist()
        return [r[schema.SOURCE] for r in out]

    assert read(sources[:2]) == sources[2:]  # one row missing: the tar is read
    real_open = tarfile.open

    def no_open(*args, **kwargs):
        raise AssertionError("a finished tar was opened again")

    monkeypatch.setattr(tarfile, "open", no_open)
    assert read(sources) == []
    assert read([*sources, f"{tar}#old.jpg"]) == []  # rows of an earlier version: still done
    monkeypatch.setattr(tarfile, "open", real_open)

    _tar(tar, [("a.jpg", b"AAAA"), ("b.png", b"BB"), ("c", b"C"), ("d.jpg", b"D" * 600)])
    os.utime(tar, ns=(1, 1))  # the same size (tar pads to 10 KB) but another mtime
    assert read(sources) == [f"{tar}#d.jpg"]  # replaced: read again

    cut = tmp_path / "cut.tar"
    cut.write_bytes(tar.read_bytes()[:1100])
    done = [r[schema.SOURCE] for r in reader({schema.SOURCE: [str(cut)]}).to_pylist()]
    assert f"{cut}#<rest>" in done  # ended in error: no note, so it is opened again
    monkeypatch.setattr(tarfile, "open", no_open)
    (again,) = reader({schema.SOURCE: [str(cut)], "done_members": [done]}).to_pylist()
    assert "opened again" in again[schema.DETAIL]


def _walk_tree(tmp_path, bucket: str, tree: tuple[str, ...]):
    """`tree`'s files (one byte each) under `tmp_path` and in a new S3 bucket; returns the
    local `in` folder and a function naming what `list_inputs` lists, relative to `in/`."""
    import boto3
    import fsspec

    fs = fsspec.filesystem("s3")
    boto3.client("s3").create_bucket(
        Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": "us-west-2"}
    )
    for rel in tree:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
        fs.pipe(f"{bucket}/{rel}", b"x")

    def names(inputs: list[str]) -> list[str]:
        return sorted(i.uri.rsplit("/in/", 1)[-1] for i in list_inputs(inputs))

    return tmp_path / "in", names


def test_files_in_hidden_folders_are_not_inputs_unless_named(tmp_path, s3_server):
    """A folder walk skipped hidden files but listed everything in hidden folders: the
    pictures a desktop's trash keeps (`.Trash-1000/files/`), a `.git` store, thumbnail caches
    (`.thumbnails/`) became inputs. Naming such a folder or file still lists it, also when
    the folder above it is an INPUT too; the small-job count and S3 prefixes agree."""
    tree = ("in/a.jpg", "in/.Trash-1000/files/deleted.jpg", "in/sub/.thumbnails/t.png",
            "in/sub/b.png", "in/.git/objects/x.jpg", "in/v.1/c.jpg")  # fmt: skip
    folder, names = _walk_tree(tmp_path, "hidden-walk", tree)

    assert names([str(folder)]) == ["a.jpg", "sub/b.png", "v.1/c.jpg"]
    trash = folder / ".Trash-1000"
    assert names([str(trash)]) == [".Trash-1000/files/deleted.jpg"]
    assert names([str(folder), str(trash)]) == [
        ".Trash-1000/files/deleted.jpg", "a.jpg", "sub/b.png", "v.1/c.jpg"]
    thumb = folder / "sub" / ".thumbnails" / "t.png"
    assert names([str(folder), str(thumb)]) == ["a.jpg", "sub/.thumbnails/t.png", "sub/b.png",
                                                 "v.1/c.jpg"]  # fmt: skip
    assert few_local_files(plan_inputs([str(folder)]), 3)
    assert not few_local_files(plan_inputs([str(folder)]), 2)
    assert names(["s3://hidden-walk/in"]) == ["a.jpg", "sub/b.png", "v.1/c.jpg"]
    assert names(["s3://hidden-walk/in", "s3://hidden-walk/in/.git"]) == [
        ".git/objects/x.jpg", "a.jpg", "sub/b.png", "v.1/c.jpg"]


def test_storage_systems_folders_are_not_inputs_unless_named(tmp_path, s3_server):
    """A Synology share holds five thumbnails per picture in `@eaDir/<picture>/`, its deleted
    pictures in `#recycle/` and a copy of everything in `#snapshot/`; Windows drives hold
    `$RECYCLE.BIN/` (`$Recycle.Bin` since Vista); a zip made on a Mac holds `__MACOSX/`. A walk
    listed them all as inputs. Named as an INPUT, such a folder is listed; a file or folder
    that merely contains such a name (`recycle/`, `my@eaDir/`) stays an input."""
    tree = ("in/a.jpg", "in/@eaDir/a.jpg/SYNOPHOTO_THUMB_XL.jpg", "in/#recycle/old.jpg",
            "in/#snapshot/GMT+00-2026.12.01/a.jpg", "in/sub/$Recycle.Bin/S-1-5-21/$RX1.jpg",
            "in/System Volume Information/x.jpg", "in/__MACOSX/sub/._b.png", "in/sub/b.png",
            "in/recycle/c.jpg", "in/my@eaDir/d.jpg")  # fmt: skip
    folder, names = _walk_tree(tmp_path, "nas-walk", tree)
    kept = ["a.jpg", "my@eaDir/d.jpg", "recycle/c.jpg", "sub/b.png"]
    assert names([str(folder)]) == kept
    assert names([str(folder / "#recycle")]) == ["#recycle/old.jpg"]
    assert names([str(folder), str(folder / "#recycle")]) == ["#recycle/old.jpg", *kept]
    assert few_local_files(plan_inputs([str(folder)]), 4)
    assert not few_local_files(plan_inputs([str(folder)]), 3)
    assert names(["s3://nas-walk/in"]) == kept
    assert names(["s3://nas-walk/in", "s3://nas-walk/in/@eaDir"]) == [
        "@eaDir/a.jpg/SYNOPHOTO_THUMB_XL.jpg", *kept]


def test_a_sparse_member_is_refused_and_a_huge_caption_member_is_no_caption(tmp_path):
    """A `tar --sparse` member was analysed (tarfile fills its holes) but recorded at an
    offset that holds the sparse map, so its shard write failed on every rerun and an exact
    copy elsewhere was lost with it; a 20 MB `.txt` member became a 20 MB caption, where a
    sidecar file over 16 MiB is none."""
    from curation.io.readers import SIDECAR_MAX_BYTES

    folder = tmp_path / "in"
    folder.mkdir()
    holey = folder / "holey.jpg"
    with holey.open("wb") as fh:
        fh.write(b"\xff\xd8\xff\xe0" + b"x" * 1000)
        fh.seek(4 * 2**20)  # a hole the file system keeps unallocated
        fh.write(b"\xff\xd9")
    (folder / "holey.txt").write_text("a caption")
    sparse = tmp_path / "sparse.tar"
    subprocess.run(["tar", "--sparse", "-cf", str(sparse), "-C", str(folder), "holey.jpg",
                    "holey.txt"], check=True)  # fmt: skip
    with tarfile.open(sparse) as tf:
        if not tf.getmember("holey.jpg").issparse():
            pytest.skip("this file system keeps no holes: tar stored the file whole")
    (row,) = TarReader()({schema.SOURCE: [str(sparse)]}).to_pylist()
    assert row[schema.SOURCE] == f"{sparse}#holey.jpg"
    assert row[schema.REASON] == "unsupported_format" and "sparse" in row[schema.DETAIL]

    big = tmp_path / "big.tar"
    _tar(big, [("a.jpg", b"\xff\xd8 an image"), ("a.txt", b"w" * (SIDECAR_MAX_BYTES + 1)),
               ("b.jpg", b"\xff\xd8 another"), ("b.txt", b"a short caption")])  # fmt: skip
    rows = {r[schema.SOURCE].rsplit("#", 1)[1]: r
            for r in TarReader()({schema.SOURCE: [str(big)]}).to_pylist()}  # fmt: skip
    assert rows["a.jpg"][schema.CAPTION_EN] is None
    assert rows["b.jpg"][schema.CAPTION_EN] == "a short caption"


def test_s3_keys_are_taken_as_written(s3_server):
    """`p/./a.jpg` and `p/../b.jpg` were hidden folders (no row); `x.jpg` and the prefix
    `x.jpg/` named together, or `d/b.jpg` and `d//b.jpg`, were called the same INPUT and one
    was never read; a key holding `::` was read as fsspec's URL chaining (a TypeError)."""
    import boto3
    import fsspec

    from curation.io.listing import drop_covered_inputs

    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="as-written",
                     CreateBucketConfiguration={"LocationConstraint": "us-west-2"})  # fmt: skip
    keys = ["p/./dot.jpg", "p/../up.jpg", "p/c/../e.jpg", "p/col::on.jpg", "x.jpg",
            "x.jpg/y.jpg", "d/b.jpg", "d//b.jpg"]  # fmt: skip
    for key in keys:
        s3.put_object(Bucket="as-written", Key=key, Body=key.encode())
    fsspec.filesystem("s3").invalidate_cache()
    base = "s3://as-written"
    assert sorted(i.uri for i in list_inputs([f"{base}/p"])) == [
        f"{base}/p/../up.jpg", f"{base}/p/./dot.jpg", f"{base}/p/c/../e.jpg",
        f"{base}/p/col::on.jpg"]  # fmt: skip
    args = [f"{base}/x.jpg", f"{base}/x.jpg/", f"{base}/d/b.jpg", f"{base}/d//b.jpg"]
    kept, note = drop_covered_inputs(plan_inputs(args))
    assert [s.uri for s in kept] == args and note is None
    assert sorted(i.uri for i in list_inputs(args)) == sorted(
        [f"{base}/x.jpg", f"{base}/x.jpg/y.jpg", f"{base}/d/b.jpg", f"{base}/d//b.jpg"])
    uris = [f"{base}/{k}" for k in keys]
    rows = FileReader()({schema.SOURCE: uris, SIDECAR: [None] * len(uris)}).to_pylist()
    assert [r[schema.DATA] for r in rows] == [k.encode() for k in keys]


def test_a_member_named_as_a_repeat_is_named_gets_a_row_of_its_own(tmp_path):
    """A name stored twice gives its second row `x.jpg#2`; a member literally named `x.jpg#2`
    got the same source, and one of the two images had no manifest row."""
    tar = tmp_path / "repeats.tar"
    _tar(tar, [("x.jpg", b"\xff\xd8 1"), ("x.jpg", b"\xff\xd8 2"), ("x.jpg#2", b"\xff\xd8 3"),
               ("x.jpg", b"\xff\xd8 4")])  # fmt: skip
    rows = TarReader()({schema.SOURCE: [str(tar)]}).to_pylist()
    sources = [r[schema.SOURCE] for r in rows]
    assert len(set(sources)) == len(sources) == 4, sources
    assert sorted(r[schema.DATA][-1:] for r in rows) == [b"1", b"2", b"3", b"4"]
