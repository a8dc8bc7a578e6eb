import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from pipelines.config import ConfigError, JobConfig, dump_yaml, load_config


def test_defaults_match_the_paper_and_validate():
    cfg = load_config()
    assert cfg.probe.min_pixels == 3840 * 2160
    assert (cfg.analyze.flat_patch, cfg.analyze.flat_variance, cfg.analyze.max_flat_fraction) == (
        240,
        800.0,
        0.5,
    )
    assert cfg.analyze.min_entropy == 7.0


def test_yaml_and_overrides_apply(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("analyze:\n  min_entropy: 6\ndedup:\n  max_hamming: 4\n")
    cfg = load_config(f, ["shard.max_samples=10"])
    assert (
        cfg.analyze.min_entropy == 6.0
        and cfg.dedup.max_hamming == 4
        and cfg.shard.max_samples == 10
    )


@pytest.mark.parametrize(
    "text,key",
    [
        ("analyze:\n  min_entrpy: 6\n", "analyze.min_entrpy"),
        ("analyse:\n  min_entropy: 6\n", "analyse"),
        ("shard:\n  max_samples: many\n", "shard.max_samples"),
        ("dedup:\n  enabled: 1\n", "dedup.enabled"),
        ("probe:\n  min_aspect: 4\n", "probe.min_aspect"),
        ("bucket:\n  buckets: ['4000x3000']\n", "bucket.buckets"),
        # a placeholder the captioner cannot fill failed the job in its last model stage
        ("caption:\n  hint_template: '{prompt} Caption: {caption}'\n", "caption.hint_template"),
        ("caption:\n  hint_template: '{prompt} {0}'\n", "caption.hint_template"),
        # nudenet's 640m model at 640 px needs thumbnails that large; its side is on the grid
        ("models:\n  nudenet_resolution: 640\n", "models.nudenet_resolution"),
        ("models:\n  nudenet_resolution: 300\n", "models.nudenet_resolution"),
        # each of these made the job reject every input, or fail at Ray's start
        ("probe:\n  max_file_bytes: 0\n", "probe.max_file_bytes"),
        ("score:\n  min_quality: 50\n  max_quality: 10\n", "score.min_quality"),
        ("analyze:\n  min_native_score: 1.5\n", "analyze.min_native_score"),
        ("analyze:\n  flat_variance: -1\n", "analyze.flat_variance"),
        ("ray:\n  object_store_memory: 1000\n", "ray.object_store_memory"),
        ("score:\n  semantic_exact_max: -5\n", "score.semantic_exact_max"),
        ("caption:\n  translation_max_new_tokens: 0\n", "caption.translation_max_new_tokens"),
    ],
)
def test_bad_config_names_the_key(tmp_path, text, key):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(f)


def test_an_empty_section_takes_overrides(tmp_path):
    """`probe:` alone (every key of `native4k config`'s output commented out) is the section's
    defaults; `--set probe.min_pixels=...` said it named no setting."""
    f = tmp_path / "c.yaml"
    f.write_text("probe:\nanalyze:\n  # min_entropy: 6\n")
    cfg = load_config(f, overrides=["probe.min_pixels=1000", "analyze.min_entropy=5"])
    assert (cfg.probe.min_pixels, cfg.analyze.min_entropy) == (1000, 5)
    assert cfg.probe.max_pixels == JobConfig().probe.max_pixels


def test_dump_is_documented_and_round_trips(tmp_path):
    text = dump_yaml(JobConfig())
    assert "# Reject (flat) when more than this fraction of patches is flat." in text
    f = tmp_path / "c.yaml"
    f.write_text(text)
    assert load_config(f) == JobConfig()
    assert yaml.safe_load(text)["probe"]["min_pixels"] == 8294400


@given(
    st.floats(min_value=1e-9, max_value=1e9, allow_nan=False),
    st.sampled_from(["{:e}", "{:E}", "{:.3e}"]),
)
def test_numbers_in_exponent_notation_are_numbers(value, fmt):
    """YAML 1.1 reads `1e-3` (no dot) as text; a float setting still takes it as a number."""
    text = fmt.format(value)
    cfg = load_config(overrides=[f"analyze.min_sharpness={text}"])
    assert cfg.analyze.min_sharpness == float(text)


@pytest.mark.parametrize("text", [".nan", ".inf", "-.inf", ".NaN"])
def test_a_threshold_must_be_finite(text):
    """`sharpness < nan` is never true: a NaN threshold would switch the rule off silently."""
    with pytest.raises(ConfigError, match=r"analyze\.min_sharpness.*finite"):
        load_config(overrides=[f"analyze.min_sharpness={text}"])
    with pytest.raises(ConfigError, match=r"probe\.max_aspect.*finite"):
        load_config(overrides=[f"probe.max_aspect={text}"])


@pytest.mark.parametrize("scales", ["[-1]", "[0]", "[1.0, 0]"])
def test_tier_scales_must_be_positive(scales):
    with pytest.raises(ConfigError, match=r"bucket\.tier_scales.*positive"):
        load_config(overrides=[f"bucket.tier_scales={scales}"])


def test_a_config_file_that_is_not_utf8_is_one_error(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(f)


@pytest.mark.parametrize("text", ["- a\n- b\n", "42\n", "just text\n"])
def test_a_config_file_that_is_no_mapping_is_one_error(tmp_path, text):
    """A YAML list as --config, with a --set, ended in an AttributeError traceback (exit 1)."""
    f = tmp_path / "c.yaml"
    f.write_text(text)
    for overrides in ([], ["dedup.max_hamming=3"]):
        with pytest.raises(ConfigError, match=r"c\.yaml must hold a mapping"):
            load_config(f, overrides)


def test_an_override_that_is_not_yaml_is_its_text():
    """`--set caption.hint_template={prompt} with {{braces}}: {hint}` ended in a YAML parser
    traceback (exit 1) instead of setting the text or naming the key."""
    template = "{prompt} with {{braces}}: {hint}"
    cfg = load_config(overrides=[f"caption.hint_template={template}"])
    assert cfg.caption.hint_template == template
    with pytest.raises(ConfigError, match=r"'score\.batch_size' must be an integer"):
        load_config(overrides=["score.batch_size={oops"])


def test_a_job_without_models_needs_no_thumbnail_sizes():
    """`score.enabled=false` with `analyze.thumbnail_size=0` (no model, no thumbnail) was
    refused because the unused score.quality_size was larger than the thumbnails."""
    cfg = load_config(None, ["score.enabled=false", "analyze.thumbnail_size=0"])
    assert cfg.analyze.thumbnail_size == 0
    big = load_config(None, ["analyze.thumbnail_size=640", "models.nudenet_resolution=640"])
    assert big.models.nudenet_resolution == 640


def test_stages_that_see_thumbnails_need_them_whatever_turns_them_on():
    """The captioner runs with the scores off, and nudenet through `models.nudenet=auto`:
    neither was counted, so 16-px (or no) thumbnails passed the check and the model pass
    failed after the whole analysis, or nudenet judged 16-px images."""
    for sets in (["score.enabled=false", "models.caption_model=/m/vlm"],
                 ["score.quality_metric="]):  # nudenet (installed for the tests) on its own
        with pytest.raises(ConfigError, match=r"'analyze\.thumbnail_size' must be at least 64"):
            load_config(None, [*sets, "analyze.thumbnail_size=16"])
    with pytest.raises(ConfigError, match=r"'models\.nudenet_resolution' must be a multiple"):
        load_config(None, ["score.quality_metric=", "models.nudenet_resolution=640"])
    # Translation alone reads captions, no image.
    load_config(None, ["score.enabled=false", "models.translation_model=/m/mt",
                       "analyze.thumbnail_size=0"])  # fmt: skip
    # A stage named nudenet, nudenet not installed: taken, then failed after the analysis.
    import curation.score.nudenet_detector as detector

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(detector, "nudenet_available", lambda: False)
        for which in ("person_model", "safety_model"):
            with pytest.raises(ConfigError, match=rf"'score\.{which}' is nudenet, which is not"):
                load_config(None, [f"score.{which}=nudenet"])
        load_config(None, ["score.person_model=none", "score.safety_model=none"])
    # Person prompts against no other prompts: person_score was 1 for every image.
    with pytest.raises(ConfigError, match=r"'score\.other_prompts' must not be empty"):
        load_config(None, ["score.other_prompts=[]", "models.clip_weights=/m/clip.bin"])
    load_config(None, ["score.other_prompts=[]"])  # no CLIP: no person_score from prompts


def _settings(cls=JobConfig, prefix=""):
    """(dotted key, annotated type) of every setting of the job's configuration."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _settings(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", hints[f.name]


@pytest.mark.parametrize(("key", "typ"), list(_settings()), ids=lambda v: str(v))
def test_an_empty_override_is_the_empty_text_or_off_or_a_clear_error(key, typ):
    """`--set score.quality_metric=` (nothing after `=`) failed "must be a string, got None"
    while `--set score.quality_metric=""` worked: an empty value is the empty string for
    text, None ("off") for an optional setting, and one clear error for any other type."""
    import typing

    section, name = key.split(".")
    if type(None) in typing.get_args(typ):
        assert getattr(getattr(load_config(None, [f"{key}="]), section), name) is None
    elif typ is str:

        def outcome(text: str) -> object:
            try:
                return load_config(None, [f"{key}={text}"])
            except ConfigError as e:  # text that must not be empty: its own rule says why
                return str(e)

        empty = outcome("")
        assert empty == outcome('""')
        if isinstance(empty, str):
            assert f"'{key}'" in empty and "must be a string" not in empty, empty
        else:
            assert getattr(getattr(empty, section), name) == ""
    else:
        with pytest.raises(ConfigError, match=rf"config key '{key}' needs a value after '='"):
            load_config(None, [f"{key}= "])


def test_an_empty_override_on_the_command_line(capsys):
    from pipelines.cli import main

    assert main(["config", "--set", "score.quality_metric=", "--set", "score.min_quality=",
                 "--set", "models.clip_weights="]) == 0  # fmt: skip
    dumped = yaml.safe_load(capsys.readouterr().out)
    assert dumped["score"]["quality_metric"] == "" and dumped["score"]["min_quality"] is None
    assert main(["config", "--set", "probe.min_pixels="]) == 2
    err = capsys.readouterr().err
    assert err == ("native4k: configuration error: config key 'probe.min_pixels' needs a value "
                   "after '=' (an integer)\n")  # fmt: skip
