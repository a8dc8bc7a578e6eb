import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from curation import schema
from curation.caption.captioner import VlmCaptioner, input_caption_source
from curation.caption.translator import CaptionTranslator


@pytest.fixture(scope="module")
def vlm(tmp_path_factory) -> str:
    from curation.score.random_models import build_vlm

    return build_vlm(tmp_path_factory.mktemp("models") / "tiny-vlm")


@pytest.fixture(scope="module")
def translator(tmp_path_factory) -> str:
    from curation.score.random_models import build_translator

    return build_translator(tmp_path_factory.mktemp("models") / "tiny-mt")


def _thumb(seed: int, size=(96, 64)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _batch() -> dict:
    return {
        schema.SOURCE: ["/d/a.jpg", "/d/b#c.jpg", "/t/x.tar#c", "/d/none.jpg"],
        schema.TAR_OFFSET: [None, None, 1536, None],
        schema.THUMBNAIL: [_thumb(0), _thumb(1), _thumb(2, (64, 96)), None],
        schema.CAPTION_EN: [None, "a sidecar caption", "a tar caption", None],
    }


def test_captions_only_where_missing_and_credits_each_source(vlm):
    stage = VlmCaptioner(model_path=vlm, max_new_tokens=6)
    out = stage(_batch())
    caps = out[schema.CAPTION_EN].to_pylist()
    srcs = out[schema.CAPTION_SOURCE].to_pylist()
    assert isinstance(caps[0], str) and caps[0] not in ("a sidecar caption", "a tar caption")
    assert caps[1:3] == ["a sidecar caption", "a tar caption"]
    assert srcs == ["tiny-vlm", "sidecar", "tar", None]
    assert caps[3] is None  # no thumbnail: nothing to caption


def test_batched_generation_matches_one_at_a_time(vlm):
    stage = VlmCaptioner(model_path=vlm, max_new_tokens=5)
    stage.setup()
    imgs = [Image.open(io.BytesIO(_thumb(i))).convert("RGB") for i in range(3)]
    prompts = ["describe", "describe this image please", "a"]
    batched, tokens = stage.generate(imgs, prompts)
    single = [stage.generate([im], [p])[0][0] for im, p in zip(imgs, prompts, strict=True)]
    assert batched == single
    assert 0 < tokens <= 3 * 5


def test_sidecar_hint_goes_into_the_prompt_and_the_model_caption_replaces_it(vlm):
    stage = VlmCaptioner(model_path=vlm, max_new_tokens=4, sidecar_hint=True, prompt="Describe.")
    assert stage.instruction("two boats") == (
        'Describe. The image came with this caption, which may help: "two boats"'
    )
    assert stage.instruction(None) == "Describe."
    out = stage(_batch())
    srcs = out[schema.CAPTION_SOURCE].to_pylist()
    assert srcs[:3] == ["tiny-vlm", "tiny-vlm+hint", "tiny-vlm+hint"]
    assert out[schema.CAPTION_EN].to_pylist()[1] != "a sidecar caption"


def test_translation_fills_missing_chinese_and_keeps_given_ones(translator):
    stage = CaptionTranslator(model_path=translator, max_new_tokens=6)
    out = stage(
        {
            schema.CAPTION_EN: ["a lake at dusk", "a street", None],
            schema.CAPTION_ZH: [None, "一条街道", None],
        }
    )
    zh = out[schema.CAPTION_ZH].to_pylist()
    assert isinstance(zh[0], str) and zh[1] == "一条街道" and zh[2] is None
    empty = stage(pa.table({schema.CAPTION_EN: pa.array([], pa.string())}))
    assert schema.CAPTION_ZH in empty.column_names


def test_input_caption_source():
    """A row read from a tar carries its member's offset; a `#` in a file's name is no tar."""
    assert input_caption_source(512) == "tar"
    assert input_caption_source(None) == "sidecar"


def test_a_caption_longer_than_the_translator_reads_is_cut_not_a_crash(translator):
    """A long sidecar caption (thousands of tokens) stopped the whole job with an IndexError
    in the translator's position embeddings when its tokenizer names no length limit."""
    stage = CaptionTranslator(model_path=translator, max_new_tokens=4)
    long = "a very long caption about a lake at dusk " * 200  # ~1800 tokens, 256 positions
    out = stage({schema.CAPTION_EN: [long, "a street"], schema.CAPTION_ZH: [None, None]})
    zh = out[schema.CAPTION_ZH].to_pylist()
    assert all(isinstance(z, str) for z in zh)
    alone = stage({schema.CAPTION_EN: ["a street"], schema.CAPTION_ZH: [None]})
    assert alone[schema.CAPTION_ZH].to_pylist() == zh[1:]  # the short one is unchanged


def test_a_model_folder_of_another_kind_is_named_with_its_setting(vlm, translator, tmp_path):
    """A translator's folder given as the caption model (or the reverse, or a folder holding
    only config.json) failed inside transformers without naming the setting."""
    from curation.base import ModelFileError

    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((Path(vlm) / "config.json").read_text())
    for path in (translator, str(bare)):
        with pytest.raises(ModelFileError, match=rf"^models\.caption_model: {path} "):
            VlmCaptioner(model_path=path).setup()
    with pytest.raises(ModelFileError, match=rf"^models\.translation_model: {vlm} "):
        CaptionTranslator(model_path=vlm).setup()


def test_an_empty_model_caption_never_replaces_a_caption_or_names_the_model(
    vlm, translator, monkeypatch
):
    """A model that generates only special tokens or spaces gave `caption_en` '' credited to
    the model; with `sidecar_hint` it replaced the sidecar caption, which was lost."""
    stage = VlmCaptioner(model_path=vlm, max_new_tokens=4, sidecar_hint=True)
    stage.setup()
    monkeypatch.setattr(stage, "generate", lambda images, prompts: ([""] * len(images), 0))
    out = stage(_batch())
    assert out[schema.CAPTION_EN].to_pylist() == [None, "a sidecar caption", "a tar caption", None]
    assert out[schema.CAPTION_SOURCE].to_pylist() == [None, "sidecar", "tar", None]
    stage = CaptionTranslator(model_path=translator)
    monkeypatch.setattr(stage, "translate", lambda texts: [""] * len(texts))
    out = stage({schema.CAPTION_EN: ["a lake"], schema.CAPTION_ZH: [None]})
    assert out[schema.CAPTION_ZH].to_pylist() == [None]
