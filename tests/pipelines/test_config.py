import pytest
import yaml

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
    ],
)
def test_bad_config_names_the_key(tmp_path, text, key):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(f)


def test_dump_is_documented_and_round_trips(tmp_path):
    text = dump_yaml(JobConfig())
    assert "# Reject (flat) when more than this fraction of patches is flat." in text
    f = tmp_path / "c.yaml"
    f.write_text(text)
    assert load_config(f) == JobConfig()
    assert yaml.safe_load(text)["probe"]["min_pixels"] == 8294400
