"""A job over real photographs with embedded colour profiles: recorded, kept as they are, and
shown in sRGB by the loader."""

from __future__ import annotations

import contextlib
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageCms

from pipelines.cli import main
from pipelines.verify import verify
from training.data import decode_bucket

PHOTOS = Path("/usr/share/backgrounds")
GS = Path("/usr/share/color/icc/ghostscript")


def test_profiles_are_recorded_kept_and_converted_by_the_loader(local_ray, tmp_path, capsys):
    """Two camera photographs, one as an Adobe RGB JPEG and one as a CMYK JPEG with a SWOP
    press profile, and a third without a profile: `color_profile` names the profiles (null
    for none), `stats --by color_profile` counts them, the shards keep every byte (profile
    included), and the loader's pixels are littlecms's sRGB conversion of them."""
    names = ("Kleiber_by_Lukas_Baubkus.jpg", "seeding_by_Clements_Engelhardt.jpg",
             "sunset_by_Aitzol_Berasategi.jpg")
    if not all((PHOTOS / n).exists() for n in names):
        pytest.skip("lomiri-wallpapers is not installed (.ci/run installs it)")
    if not (GS / "a98.icc").exists():
        pytest.skip("libgs-common is not installed (.ci/run installs it)")
    folder = tmp_path / "in"
    folder.mkdir()
    a98, swop = (GS / "a98.icc").read_bytes(), (GS / "default_cmyk.icc").read_bytes()
    rgb = {}
    for name, (stem, mode, icc) in zip(names, [("adobe", "RGB", a98), ("cmyk", "CMYK", swop),
                                                ("plain", "RGB", None)], strict=True):
        with Image.open(PHOTOS / name) as im:
            rgb[stem] = im.convert("RGB")
        extra = {"icc_profile": icc} if icc else {}
        rgb[stem].convert(mode).save(folder / f"{stem}.jpg", quality=95, **extra)
    out = tmp_path / "out"
    args = ["--set", "analyze.max_flat_fraction=1.0", "--set", "score.enabled=false"]
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["curate", str(folder), "--output", str(out), *args]) == 0
    rows = {Path(r["source"]).stem: r for r in pq.read_table(out / "manifest").to_pylist()}
    assert {k: (r["status"], r["color_profile"]) for k, r in rows.items()} == {
        "adobe": ("kept", "Artifex Software A98 ICC Profile"),
        "cmyk": ("kept", "Artifex CMYK SWOP Profile"),
        "plain": ("kept", None),
    }
    assert verify(str(out)) == []
    capsys.readouterr()
    assert main(["stats", str(out), "--by", "color_profile", "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert "Artifex Software A98 ICC Profile" in json.dumps(table)
    for stem in ("adobe", "cmyk"):
        r = rows[stem]
        with tarfile.open(out / r["shard"]) as tar:
            stored = tar.extractfile(f"{r['key']}.jpg").read()
        assert stored == (folder / f"{stem}.jpg").read_bytes()
        box = (r["crop_left"], r["crop_top"], r["crop_right"], r["crop_bottom"])
        w, h = box[2] - box[0], box[3] - box[1]
        target = (w // 8, h // 8)
        got = decode_bucket(stored, box, target, orientation=r["orientation"]).astype(int)
        with Image.open(io.BytesIO(stored)) as im:
            src = ImageCms.ImageCmsProfile(io.BytesIO(im.info["icc_profile"]))
            want = ImageCms.profileToProfile(im.crop(box), src, ImageCms.createProfile("sRGB"),
                                             outputMode="RGB")
        want = np.asarray(want.resize(target, Image.Resampling.LANCZOS)).astype(int)
        assert np.abs(got - want).mean() < 1.5, stem
        unmanaged = np.asarray(rgb[stem].crop(box).resize(target, Image.Resampling.LANCZOS))
        spread, before = np.ptp(got, axis=-1).mean(), np.ptp(unmanaged, axis=-1).mean()
        if stem == "adobe":  # read as sRGB, Adobe RGB values look washed out
            assert spread > 1.1 * before
        else:  # PIL's CMYK conversion ignores the press's inks (33 levels apart here)
            assert np.abs(got - unmanaged.astype(int)).mean() > 5
    assert os.path.exists(out / "_SUCCESS")
