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
    # every node builds its own .venv from the pinned project, without the test extra; with
    # the cluster extra, whose packages the job API (`ray job submit`, the dashboard's) and the
    # AWS autoscaler on the head import
    assert any('pip install -q -e ".[cluster]"' in c for c in config["setup_commands"])
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]["cluster"]  # fmt: skip
    assert any(e.startswith("ray[") and "default" in e for e in extras)
    assert any(e.startswith("boto3==") for e in extras)
    assert not any("[test]" in c or "make setup" in c for c in config["setup_commands"])
    # and never receives this machine's .venv, outputs or scratch files (.gitignore filters)
    assert ".gitignore" in config["rsync_filter"]
    ignored = (ROOT / ".gitignore").read_text().split()
    assert {".venv/", "/demo_out/", "/scratch/"} <= set(ignored)
    # the head runs the autoscaler: its profile is not the workers' S3-only one
    nodes = config["available_node_types"]
    head = nodes[config["head_node_type"]]["node_config"]["IamInstanceProfile"]["Name"]
    assert all(head != n["node_config"]["IamInstanceProfile"]["Name"]
               for k, n in nodes.items() if k != config["head_node_type"])  # fmt: skip
