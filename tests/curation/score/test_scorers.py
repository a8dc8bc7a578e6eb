import io
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from curation import schema
from curation.analyze.pixel_analyzer import decode, thumbnail_box
from curation.score.clip_embedder import ClipEmbedder
from curation.score.heads import AestheticMLP, load_aesthetic, load_safety
from curation.score.pyiqa_scorer import PyiqaScorer, lower_better, resize_longest


def _enc(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@settings(max_examples=40, deadline=None)
@given(w=st.integers(1, 20_000), h=st.integers(1, 20_000), size=st.integers(8, 1024))
def test_the_thumbnail_box_keeps_the_aspect_and_never_enlarges(w: int, h: int, size: int):
    bw, bh = thumbnail_box((w, h), size)
    assert max(bw, bh) == min(size, max(w, h))
    assert bw <= w and bh <= h
    scale = max(bw, bh) / max(w, h)
    for got, side in ((bw, w), (bh, h)):  # each side is the scaled one, rounded (at least 1)
        assert got == max(1, round(side * scale))


def test_a_wide_jpeg_thumbnail_is_decoded_at_one_eighth_when_that_covers_it():
    rgb = np.random.default_rng(1).integers(0, 255, (2304, 4096, 3), dtype=np.uint8)
    data = _enc(Image.fromarray(rgb), "JPEG", quality=80)
    im = Image.open(io.BytesIO(data))
    im.draft("RGB", thumbnail_box(im.size, 512))
    assert im.size == (512, 288)  # libjpeg's 1/8 scale: a square request would get 1/4
    thumb = Image.open(io.BytesIO(decode(data, 1, 512)[1]))
    assert thumb.size == (512, 288)


def test_thumbnails_come_from_the_one_decode_in_every_mode_and_orientation():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (300, 500, 3), dtype=np.uint8)
    rgb[:, :250, 0] = 255  # a red left half, to check orientation and colour
    for img, fmt in [
        (Image.fromarray(rgb), "JPEG"),
        (Image.fromarray(rgb), "PNG"),
        (Image.fromarray(rgb).convert("P"), "PNG"),
        (Image.fromarray(rgb).convert("RGBA"), "PNG"),
        (Image.fromarray(rgb).convert("CMYK"), "JPEG"),
        (Image.fromarray(rgb[..., 0].astype(np.uint16) * 257), "PNG"),
    ]:
        gray, thumb = decode(_enc(img, fmt), 1, 128)
        t = Image.open(io.BytesIO(thumb))
        assert t.format == "JPEG" and t.mode == "RGB" and max(t.size) == 128, (img.mode, fmt)
        assert gray.shape == (300, 500)
    gray, thumb = decode(_enc(Image.fromarray(rgb), "JPEG"), 6, 128)  # rotate 90° clockwise
    t = np.asarray(Image.open(io.BytesIO(thumb)))
    assert gray.shape == (500, 300) and t.shape[:2] == (128, 77)
    assert t[:40, :, 0].mean() > 200 > t[-40:, :, 0].mean()  # red half now on top
    assert decode(_enc(Image.fromarray(rgb)), 1, 0)[1] is None  # 0: no thumbnail


def test_clip_embedder_embeds_once_and_feeds_every_head(tiny_clip, real_thumbnails):
    stage = ClipEmbedder(
        model=tiny_clip["config"],
        weights=tiny_clip["weights"],
        aesthetic_weights=tiny_clip["aesthetic"],
        safety_weights=tiny_clip["safety"],
        person_prompts=["a photo of a person"],
        other_prompts=["a photo of a landscape", "an abstract image"],
        character_threshold=0.4,
    )
    thumbs = [*real_thumbnails, None]
    out = stage({schema.SOURCE: [f"s{i}" for i in range(len(thumbs))], schema.THUMBNAIL: thumbs})
    emb = out[schema.EMBEDDING].to_pylist()
    assert emb[-1] is None and out[schema.AESTHETIC][len(thumbs) - 1].as_py() is None
    x = torch.tensor(emb[:-1])
    assert x.shape == (len(real_thumbnails), tiny_clip["dim"])
    assert torch.allclose(x.norm(dim=-1), torch.ones(len(x)), atol=1e-5)
    # The aesthetic column is the LAION MLP applied to the normalised embedding, nothing else.
    mlp = load_aesthetic(tiny_clip["aesthetic"], tiny_clip["dim"])
    expect = mlp(x).detach().numpy()
    got = np.array(out[schema.AESTHETIC].to_pylist()[:-1])
    assert np.allclose(got, expect, atol=1e-5)
    nsfw = np.array(out[schema.NSFW].to_pylist()[:-1])
    person = np.array(out[schema.PERSON_SCORE].to_pylist()[:-1])
    assert ((nsfw >= 0) & (nsfw <= 1)).all() and ((person >= 0) & (person <= 1)).all()
    assert out[schema.CHARACTER].to_pylist()[:-1] == [bool(p >= 0.4) for p in person]
    # Different photographs get different embeddings (not a constant output).
    assert not torch.allclose(x[0], x[1])
    empty = stage(pa.table({schema.SOURCE: pa.array([], pa.string())}))
    assert set(ClipEmbedder.writes) <= set(empty.column_names)


def test_clip_embedder_without_heads_leaves_their_columns_alone(tiny_clip, real_thumbnails):
    stage = ClipEmbedder(model=tiny_clip["config"], weights=tiny_clip["weights"])
    out = stage({schema.SOURCE: ["a"], schema.THUMBNAIL: real_thumbnails[:1], schema.NSFW: [0.25]})
    assert out[schema.NSFW].to_pylist() == [0.25]  # another stage's safety score survives
    assert schema.AESTHETIC not in out.column_names
    assert len(out[schema.EMBEDDING][0].as_py()) == tiny_clip["dim"]


def test_aesthetic_head_has_laions_layout_and_rejects_other_files(tmp_path, tiny_clip):
    keys = set(AestheticMLP(768).state_dict())
    assert keys == {f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")}
    with pytest.raises(ValueError, match=r"aesthetic\.pth is not a LAION aesthetic MLP for 768"):
        load_aesthetic(tiny_clip["aesthetic"], 768)
    with pytest.raises(ValueError, match="safety"):
        load_safety(tiny_clip["safety"], 768)


@settings(max_examples=10, deadline=None)
@given(st.lists(st.integers(1, 12), min_size=0, max_size=3))
def test_safety_head_loads_any_depth(tmp_path_factory, hidden):
    from curation.score.random_models import build_safety

    path = tmp_path_factory.mktemp("safety") / "head.pt"
    build_safety(path, [8, *hidden, 1])
    head = load_safety(path, 8)
    x = torch.randn(5, 8)
    state = torch.load(path, weights_only=True)
    h = x
    n = len(hidden) + 1
    for i in range(n):
        h = h @ state[f"{2 * i}.weight"].T + state[f"{2 * i}.bias"]
        if i < n - 1:
            h = h.relu()
    assert torch.allclose(head(x), torch.sigmoid(h.squeeze(-1)), atol=1e-6)


def test_pyiqa_scorer_is_the_metric_at_the_documented_size(real_thumbnails):
    import pyiqa

    stage = PyiqaScorer(metric="piqe", input_size=256)
    out = stage({schema.SOURCE: ["a", "b", "c"], schema.THUMBNAIL: [*real_thumbnails[:2], None]})
    got = out[schema.QUALITY].to_pylist()
    assert got[2] is None
    metric = pyiqa.create_metric("piqe", device="cpu")
    for thumb, value in zip(real_thumbnails[:2], got[:2], strict=True):
        img = resize_longest(Image.open(io.BytesIO(thumb)).convert("RGB"), 256)
        assert max(img.size) == 256
        x = torch.from_numpy(np.asarray(img)).permute(2, 0, 1)[None].float() / 255
        assert value == pytest.approx(float(metric(x)), rel=1e-5)
    assert lower_better("piqe") and not lower_better("musiq")
    with pytest.raises(ValueError, match="unknown pyiqa metric 'no_such_metric'"):
        lower_better("no_such_metric")


def test_the_drivers_metric_table_is_pyiqas_without_importing_torch():
    """The job's driver checks the metric name and its direction; importing pyiqa would cost
    it torch (about 4 s and 700 MB) for one table."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from curation.score.pyiqa_scorer import lower_better\n"
        "assert lower_better('piqe') and not lower_better('musiq')\n"
        "assert 'torch' not in sys.modules and 'pyiqa' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    from pyiqa.default_model_configs import DEFAULT_CONFIGS

    from curation.score.pyiqa_scorer import _pyiqa_configs

    assert _pyiqa_configs().keys() == DEFAULT_CONFIGS.keys()
    for name, config in DEFAULT_CONFIGS.items():
        assert lower_better(name) == bool(config.get("lower_better", False))


def test_a_model_file_that_does_not_load_is_named_with_its_setting(tmp_path, tiny_clip):
    """A garbage, truncated or other-architecture clip_weights file failed deep inside
    open_clip (torch's unpickling text even suggests `weights_only=False`), and a head of the
    wrong width named its file but not the setting: the error names both."""
    from curation.base import ModelFileError
    from curation.score.random_models import TINY_CLIP, build_aesthetic, build_open_clip

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(Path(tiny_clip["weights"]).read_bytes()[:4096])
    wider = build_open_clip(tmp_path, "tiny-clip-wider", {**TINY_CLIP, "embed_dim": 48})
    for weights in (garbage, truncated, wider["weights"]):
        stage = ClipEmbedder(model=tiny_clip["config"], weights=str(weights))
        with pytest.raises(ModelFileError, match=rf"^models\.clip_weights: {weights} ") as e:
            stage.setup()
        assert "weights_only=False" not in str(e.value)
    wrong = build_aesthetic(tmp_path / "aes48.pth", 48)
    for setting, kw in (
        ("models.aesthetic_weights", {"aesthetic_weights": wrong}),
        ("models.safety_weights", {"safety_weights": str(garbage)}),
    ):
        stage = ClipEmbedder(model=tiny_clip["config"], weights=tiny_clip["weights"], **kw)
        with pytest.raises(ModelFileError, match=rf"^{setting}: {next(iter(kw.values()))} "):
            stage.setup()
    for arch in ("ViT-Q-99", str(garbage.with_suffix(".json"))):
        garbage.with_suffix(".json").write_text("{not json")
        stage = ClipEmbedder(model=arch, weights=tiny_clip["weights"])
        with pytest.raises(ModelFileError, match=rf"^models\.clip_model: {arch} "):
            stage.setup()
    # ... and the bad JSON was not registered: open_clip rescans every registered config
    # on each registration, so it failed every later model config in this process
    from curation.score.random_models import build_open_clip

    build_open_clip(tmp_path / "after", "tiny-clip-after-garbage")
    with pytest.raises(ModelFileError, match=rf"^models\.pyiqa_weights: {garbage} "):
        PyiqaScorer(metric="brisque", weights=str(garbage)).setup()


def test_a_pyiqa_file_that_leaves_the_network_random_is_refused(tmp_path, real_thumbnails):
    """pyiqa loads MetaIQA's file with `strict=False`: an empty file, another model's, or its
    own weights nested where it does not look left the network random, and those scores went
    into the manifest as real ones. The network's own weights still load, and score."""
    import torch
    from pyiqa.archs.metaiqa_arch import MetaIQA

    from curation.base import ModelFileError

    torch.manual_seed(0)
    weights = MetaIQA(pretrained=False).state_dict()
    files = {"own.pth": weights, "module.pth": {f"module.{k}": v for k, v in weights.items()},
             "empty.pth": {}, "nested.pth": {"params": weights},
             "other.pth": {"fc.weight": torch.randn(1, 768), "fc.bias": torch.randn(2)}}
    for name, content in files.items():
        torch.save(content, tmp_path / name)
    for name in ("own.pth", "module.pth"):
        stage = PyiqaScorer(metric="metaiqa", weights=str(tmp_path / name), input_size=256)
        scores = stage({schema.THUMBNAIL: real_thumbnails[:2]})[schema.QUALITY].to_pylist()
        assert all(math.isfinite(v) for v in scores), name
    for name in ("empty.pth", "nested.pth", "other.pth"):
        path = tmp_path / name
        with pytest.raises(ModelFileError, match=rf"^models\.pyiqa_weights: {path} .*random"):
            PyiqaScorer(metric="metaiqa", weights=str(path)).setup()


def test_which_pyiqa_metrics_take_a_weight_file():
    """Q-Align's family loads from the Hugging Face cache and takes no file: `native4k models`
    asked for a models.pyiqa_weights file, which then failed with a TypeError."""
    from curation.score.pyiqa_scorer import takes_weight_file

    assert takes_weight_file("musiq") and takes_weight_file("metaiqa")
    assert not takes_weight_file("piqe") and not takes_weight_file("qalign")


def test_a_panorama_far_wider_than_3_to_1_gets_a_quality_score():
    """With `probe.max_aspect` raised for panoramas, a 100:1 image's 512-px thumbnail is 5
    px high and piqe failed on it ('maximum size for tensor at dimension 2 is 10'), failing
    the whole job's model pass."""
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (5, 512, 3), dtype=np.uint8)).save(buf, "JPEG")
    out = PyiqaScorer(metric="piqe", input_size=512)({schema.THUMBNAIL: [buf.getvalue()]})
    assert 0 <= out[schema.QUALITY][0].as_py() <= 100


def test_a_pyiqa_weight_file_left_set_does_not_stop_a_weightless_metric(tmp_path):
    """`models.pyiqa_weights` left set after switching back to piqe: `native4k models` said
    all was well, then the model pass failed (PIQE got 'pretrained_model_path')."""
    left = tmp_path / "musiq.pth"
    left.write_bytes(b"weights of another metric")
    stage = PyiqaScorer(metric="piqe", weights=str(left))
    stage.setup()


def test_a_metric_without_a_value_for_an_image_gives_null_not_nan():
    """piqe of an all-black image is NaN: it passed every quality threshold and reached the
    manifest as NaN (null in the shard's `.json`), neither a score nor 'not scored'."""
    thumbs = []
    for value in (0, 128):
        buf = io.BytesIO()
        Image.fromarray(np.full((288, 512, 3), value, np.uint8)).save(buf, "JPEG")
        thumbs.append(buf.getvalue())
    out = PyiqaScorer(metric="piqe", input_size=512)({schema.THUMBNAIL: thumbs})
    black, grey = out[schema.QUALITY].to_pylist()
    assert black is None and grey is not None and 0 <= grey <= 100


@pytest.mark.parametrize(
    ("metric", "words"),
    [("psnr", "full-reference"), ("lpips", "full-reference"), ("fid", "dataset")],
)
def test_a_metric_that_needs_a_reference_is_a_configuration_error(metric, words):
    """`score.quality_metric=psnr` (or ssim, lpips, fid) was taken for a metric that needs
    weights: `native4k models` asked the user to download pyiqa's 'psnr' weights, which do
    not exist; a job with any file there failed in the model pass."""
    from pipelines.config import ConfigError, load_config
    from pipelines.model_pass import check_metric

    want = f"'score.quality_metric': pyiqa metric '{metric}' is {words}"
    with pytest.raises(ConfigError, match=want):
        check_metric(load_config(overrides=[f"score.quality_metric={metric}"]))
    check_metric(load_config(overrides=["score.quality_metric=musiq"]))  # no-reference: fine
