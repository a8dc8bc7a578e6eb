"""The repository's promises: the README's two commands, CI, the cluster config."""

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_readme_starts_with_the_two_commands():
    lines = [ln for ln in (ROOT / "README.md").read_text().splitlines() if ln.strip()]
    assert lines[1:4] == ["```", "make demo", "make test"]


def test_ci_runs_make_test():
    assert "make test" in (ROOT / ".ci/run").read_text()


def test_ray_cluster_config_is_valid_for_the_cluster_launcher():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load((ROOT / "ray_cluster.yaml").read_text()))
    validate_config(config)
    assert any("make setup" in c for c in config["setup_commands"])
