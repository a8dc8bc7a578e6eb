"""Training configurations: every setting checked before any model is built (no data needed)."""

from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path

import pytest

from training.config import (
    DitTrainConfig,
    StageConfig,
    TrainConfigError,
    VaeTrainConfig,
    load_train_config,
)
from training.tiny import TINY_DIT, TINY_VAE


def dit_tree(tmp_path: Path) -> dict:
    return {
        "data": {"root": str(tmp_path / "curated")},
        "model": {"architecture": dict(TINY_DIT), "vae": str(tmp_path / "vae")},
        "text": {"cache": str(tmp_path / "cache")},
        "loop": {"max_steps": 2, "output_dir": str(tmp_path / "out")},
    }


def vae_tree(tmp_path: Path) -> dict:
    return {
        "data": {"root": str(tmp_path / "curated"), "mode": "crop", "crop_size": 32},
        "model": {"architecture": dict(TINY_VAE)},
        "loss": {"perceptual_weight": 0.0},
        "loop": {"max_steps": 2, "output_dir": str(tmp_path / "out")},
    }


def test_overrides_leave_the_callers_mapping_alone(tmp_path: Path) -> None:
    """`--set`-style overrides were written into the nested sections of the `data=` mapping,
    so a caller that loads one tree twice got the first call's overrides in the second."""
    tree = dit_tree(tmp_path)
    before = copy.deepcopy(tree)
    cfg = load_train_config(
        DitTrainConfig, data=tree, overrides=["loop.max_steps=5", "optim.lr=1e-4"],
        check_files=False,
    )  # fmt: skip
    assert (cfg.loop.max_steps, cfg.optim.lr) == (5, 1e-4)
    assert tree == before
    assert load_train_config(DitTrainConfig, data=tree, check_files=False).loop.max_steps == 2


def test_a_stage_ranks_its_own_column_descending_unless_told(tmp_path: Path) -> None:
    """The stage-2 filter (top 5% by aesthetic) took the data's direction, meant for the data's
    own column: with the data ranked ascending (the least flat), the stage trained on the 5%
    *least* aesthetic images."""
    tree = dit_tree(tmp_path)
    tree["data"].update(select_column="flat_fraction", select_top=0.5, select_ascending=True)
    tree["stages"] = [
        {"name": "all", "steps": 1},
        {"name": "top", "steps": 1, "select_column": "aesthetic", "select_top": 0.05},
        {"name": "low", "steps": 1, "select_column": "aesthetic", "select_top": 0.05,
         "select_ascending": True},
    ]  # fmt: skip
    tree["loop"]["max_steps"] = 3
    cfg = load_train_config(DitTrainConfig, data=tree, check_files=False)
    data = [dataclasses.replace(cfg.data, **st.data_overrides()) for st in cfg.stages]
    got = [(d.select_column, d.select_top, d.select_ascending) for d in data]
    assert got == [
        ("flat_fraction", 0.5, True),  # no filter of its own: the data's
        ("aesthetic", 0.05, False),
        ("aesthetic", 0.05, True),
    ]
    assert StageConfig(select_ascending=True).data_overrides() == {"select_ascending": True}
    # A stage's direction with no column to rank, its own or the data's, did nothing.
    del tree["data"]["select_column"], tree["data"]["select_top"], tree["data"]["select_ascending"]
    tree["stages"][0]["select_ascending"] = True
    with pytest.raises(TrainConfigError, match=r"'stages\[0\]\.select_ascending' ranks a column"):
        load_train_config(DitTrainConfig, data=tree, check_files=False)


def test_learning_rate_defaults_are_the_papers(tmp_path: Path) -> None:
    """UltraFlux fine-tunes the DiT at 1e-6 and post-trains the VAE decoder at 1e-5; train-dit
    defaulted to the VAE's 1e-5, ten times the paper's DiT rate, also when `optim:` is given
    without `lr`."""
    dit = load_train_config(DitTrainConfig, data=dit_tree(tmp_path), check_files=False)
    assert dit.optim.lr == 1e-6
    tree = {**dit_tree(tmp_path), "optim": {"warmup_steps": 3}}
    dit = load_train_config(DitTrainConfig, data=tree, check_files=False)
    assert (dit.optim.lr, dit.optim.warmup_steps) == (1e-6, 3)
    assert load_train_config(VaeTrainConfig, data=vae_tree(tmp_path), check_files=False
                             ).optim.lr == 1e-5  # fmt: skip


def test_an_override_that_is_not_yaml_is_its_text(tmp_path: Path) -> None:
    """`--set loop.output_dir={a}-run` ended in a YAML parser traceback (exit 1) instead of
    setting the text or naming the key, as curate's `--set` does."""
    tree = dit_tree(tmp_path)
    cfg = load_train_config(
        DitTrainConfig, data=tree, overrides=["loop.output_dir={a}-run"], check_files=False
    )
    assert cfg.loop.output_dir == "{a}-run"
    with pytest.raises(TrainConfigError, match=r"'loop\.max_steps' must be an integer"):
        load_train_config(
            DitTrainConfig, data=tree, overrides=["loop.max_steps={oops"], check_files=False
        )


@pytest.mark.parametrize(
    ("which", "override", "message"),
    [
        ("dit", "optim.eps=0", r"'optim.eps' must be positive"),
        ("dit", "optim.eps=-1e-8", r"'optim.eps' must be positive"),
        ("vae", "optim.weight_decay=-0.01", r"'optim.weight_decay' must be >= 0"),
        ("dit", "loss.alpha=-0.5", r"'loss.alpha' must be >= 0"),
        ("dit", "loss.beta=-1", r"'loss.beta' must be >= 0"),
        ("dit", "data.crop_size=48", r"'data.crop_size' must be a multiple of 32"),
        ("vae", "eval.every=-1", r"'eval.every' must be >= 0"),
        ("vae", "eval.max_images=0", r"'eval.max_images' must be at least 1"),
        ("vae", "data.mode=bucket", r"'data.mode' must be 'crop' for train-vae"),
        # t was clamped into [eps, 1 - eps] after the band: every t fell outside the band
        ("dit", "stages=[{steps: 2, t_min: 0.9995}]", r"'stages\[0\].t_min' the band"),
        ("dit", "stages=[{steps: 2, t_max: 0.0005}]", r"'stages\[0\].t_min' the band"),
        # a token count below one: the resolution shift's line ran through a negative count
        ("dit", "timesteps.base_image_seq_len=-1", r"'timesteps.base_image_seq_len' must be at"),
        # a traceback from the model's constructor, or a DiT of -1 layers that trained
        ("dit", "model.architecture.bogus=1", r"'model.architecture' has unknown key\(s\) bogus"),
        ("vae", "model.architecture.bogus=1", r"'model.architecture' has unknown key\(s\) bogus"),
        ("dit", "model.architecture.num_layers=-1",
         r"'model.architecture.num_layers' must be an integer >= 0, got -1"),
        # a TypeError or ZeroDivisionError traceback after the data was planned
        ("dit", "model.architecture.num_layers=1.5",
         r"'model.architecture.num_layers' must be an integer >= 0, got 1.5"),
        ("dit", "model.architecture.attention_head_dim=0",
         r"'model.architecture.attention_head_dim' must be an integer >= 1, got 0"),
        ("dit", "model.architecture.axes_dims_rope=[4, six, 6]",
         r"'model.architecture.axes_dims_rope' must be a list of items each an integer >= 1"),
        ("dit", "model.architecture.guidance_embeds=1",
         r"'model.architecture.guidance_embeds' must be true or false"),
        ("vae", "model.architecture.stride=0",
         r"'model.architecture.stride' must be an integer >= 1, got 0"),
        ("vae", "model.architecture.shift_factor=abc",
         r"'model.architecture.shift_factor' must be a finite number, got 'abc'"),
        # torch.manual_seed's overflow once the loaders were planned, naming no key
        ("dit", "loop.seed=99999999999999999999999", r"'loop.seed' must be in \[0, 2\^32\)"),
        ("dit", "loop.seed=200000000000000", r"'loop.seed' must be in \[0, 2\^32\)"),
        # the run was written into the current folder
        ("vae", "loop.output_dir=", r"'loop.output_dir' is empty"),
        # a zero loss trained
        ("vae", "loss.perceptual_weight=0", None),
        # FileExistsError from mkdir once the run began
        ("dit", "loop.output_dir=FILE", r"'loop.output_dir' must be a folder \(it is a file\)"),
        ("vae", "loop.output_dir=FILE/run", r"'loop.output_dir' must be a folder \(.* is a file"),
    ],
)
def test_settings_that_cannot_train_are_refused_up_front(
    tmp_path: Path, which: str, override: str, message: str
) -> None:
    """Each of these was accepted, and failed (or trained nonsense) only once the run began."""
    cls, tree = (DitTrainConfig, dit_tree(tmp_path)) if which == "dit" else (
        VaeTrainConfig, vae_tree(tmp_path))  # fmt: skip
    if override.startswith("data.crop_size"):
        tree["data"]["mode"] = "crop"
    load_train_config(cls, data=tree, check_files=False)  # the tree itself is fine
    (tmp_path / "a_file").write_text("not a folder")
    override = override.replace("FILE", str(tmp_path / "a_file"))
    if message is None:  # one weight at 0 is fine, all of them are not
        overrides = [override, "loss.l2_weight=0", "loss.wavelet_weight=0"]
        with pytest.raises(TrainConfigError, match=r"all 0: there is nothing to train on"):
            load_train_config(cls, data=tree, overrides=overrides, check_files=False)
        load_train_config(cls, data=tree, overrides=overrides[:2], check_files=False)
        return
    with pytest.raises(TrainConfigError, match=message):
        load_train_config(cls, data=tree, overrides=[override], check_files=False)


def test_train_vae_defaults_to_native_pixel_crops(tmp_path: Path) -> None:
    """A VAE config that names no `data.mode` trains on crops (the shared default, `bucket`, is
    refused for the VAE); the DiT keeps `bucket`."""
    tree = vae_tree(tmp_path)
    del tree["data"]["mode"]
    assert load_train_config(VaeTrainConfig, data=tree, check_files=False).data.mode == "crop"
    assert "mode" not in tree["data"]
    assert load_train_config(DitTrainConfig, data=dit_tree(tmp_path),
                             check_files=False).data.mode == "bucket"


@pytest.mark.parametrize("which", ["dit", "vae"])
def test_a_resume_folder_that_is_no_complete_checkpoint_is_refused(
    tmp_path: Path, which: str
) -> None:
    """`loop.resume: <folder>` was first looked at after the data and models were built, and a
    `.partial` folder (a save cut off) holding `.metadata` was loaded."""
    cls, tree = (DitTrainConfig, dit_tree(tmp_path)) if which == "dit" else (
        VaeTrainConfig, vae_tree(tmp_path))  # fmt: skip
    partial = tmp_path / "out" / "checkpoints" / "step-00000004.partial"
    partial.mkdir(parents=True)
    (partial / ".metadata").write_bytes(b"")
    for folder, why in ((tmp_path / "nowhere", "not a checkpoint folder"),
                        (partial, "save did not finish")):  # fmt: skip
        with pytest.raises(TrainConfigError, match=rf"'loop.resume': .*{why}"):
            load_train_config(cls, data=tree, overrides=[f"loop.resume={folder}"])


def test_the_rope_method_of_a_fine_tune_is_one_setting(tmp_path) -> None:
    """A transformer folder without RoPE keys (as UltraFlux and Flux are released) trains with
    the paper's method unless `model.rope_method` names another, which its export keeps; an
    unknown name is refused up front."""
    import json

    import torch

    from model.transformer import UltraFluxTransformer2DModel
    from training.config import DitModelConfig, DitTrainConfig, TrainConfigError, load_train_config
    from training.dit_trainer import dit_transformer
    from training.tiny import TINY_DIT

    folder = tmp_path / "released"
    UltraFluxTransformer2DModel(**TINY_DIT).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    released = {k: v for k, v in config.items() if not k.startswith("rope_")}
    (folder / "config.json").write_text(json.dumps(released))
    cpu = torch.device("cpu")
    as_paper = dit_transformer(DitModelConfig(pretrained=str(folder)), cpu)
    assert as_paper.pos_embed.method == "resonance_yarn"
    chosen = dit_transformer(
        DitModelConfig(pretrained=str(folder), rope_method="ultraflux_released"), cpu
    )
    assert chosen.pos_embed.method == "ultraflux_released"
    chosen.save_pretrained(tmp_path / "export")
    again = UltraFluxTransformer2DModel.from_pretrained(tmp_path / "export")
    assert again.pos_embed.method == "ultraflux_released"
    random = dit_transformer(DitModelConfig(architecture=TINY_DIT, rope_method="base"), cpu)
    assert random.pos_embed.method == "base"
    with pytest.raises(TrainConfigError, match=r"model\.rope_method"):
        load_train_config(DitTrainConfig, check_files=False, data={
            "data": {"root": str(tmp_path)},
            "model": {"pretrained": str(folder), "vae": str(tmp_path), "rope_method": "ntk"},
            "text": {"source": "encoders", "encoders": str(tmp_path)},
        })  # fmt: skip


@pytest.mark.parametrize(
    ("which", "override", "words"),
    [
        ("dit", "parallel.strategy=bogus", "'parallel.strategy' must be one of 'none', 'ddp'"),
        ("vae", "optim.schedule=bogus", "'optim.schedule' must be one of 'constant', 'cosine'"),
        ("dit", "model.rope_method=bogus", "'model.rope_method' must be one of base, yarn"),
        ("dit", "loop.grad_accum_steps=-1", "'loop.grad_accum_steps' must be >= 1"),
        ("vae", "loop.keep_checkpoints=-2", "'loop.keep_checkpoints' must be >= 0"),
        ("dit", "data.batch_size=-2", "'batch_size' must be at least 1"),
        ("dit", "timesteps.base_image_seq_len=-1", "'timesteps.base_image_seq_len' must be"),
        ("dit", "loop.max_steps=", "'loop.max_steps' needs a value after '=' (an integer)"),
        ("vae", "parallel.strategy=", "'parallel.strategy' needs a value after '=' (one of 'none'"),
    ],
)
def test_a_bad_setting_on_the_command_line_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture, which: str, override: str, words: str
) -> None:
    """`native4k train-dit --set ...` with an unknown choice or a negative count: exit 2 and
    one line naming the key, before any model or data is touched."""
    import yaml

    from pipelines.cli import main

    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(dit_tree(tmp_path) if which == "dit" else vae_tree(tmp_path)))
    assert main([f"train-{which}", "--config", str(path), "--set", override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("native4k: configuration error: config ") and words in err, err
    assert len(err.strip().splitlines()) == 1, err


def _settings(cls: type, prefix: str = "") -> list[tuple[str, object]]:
    """(dotted key, annotated type) of every setting of a training configuration."""
    import typing

    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += _settings(hints[f.name], f"{prefix}{f.name}.")
        else:
            out.append((f"{prefix}{f.name}", hints[f.name]))
    return out


@pytest.mark.parametrize(
    ("which", "key", "typ"),
    [("dit", k, t) for k, t in _settings(DitTrainConfig)]
    + [("vae", k, t) for k, t in _settings(VaeTrainConfig)],
    ids=str,
)
def test_an_empty_override_means_the_empty_text_or_none_or_is_one_clear_error(
    tmp_path: Path, which: str, key: str, typ: object
) -> None:
    """`--set model.vae=` (nothing after `=`) failed "must be a string, got None" while
    `model.vae=""` was read: an empty value is `""` for text, None for an optional setting,
    and for any other type an error saying a value is needed."""
    import typing

    cls, tree = (DitTrainConfig, dit_tree(tmp_path)) if which == "dit" else (
        VaeTrainConfig, vae_tree(tmp_path))  # fmt: skip

    def outcome(text: str) -> object:
        try:
            return load_train_config(cls, data=tree, overrides=[f"{key}={text}"],
                                     check_files=False)  # fmt: skip
        except TrainConfigError as e:
            return str(e)

    if type(None) in typing.get_args(typ):
        assert outcome("") == outcome("null")
    elif typ is str:
        assert outcome("") == outcome('""')
        assert "got None" not in str(outcome(""))
    else:
        assert str(outcome(" ")).startswith(f"config key '{key}' needs a value after '=' (")


def test_an_empty_section_is_its_defaults(tmp_path: Path) -> None:
    """`timesteps:` with every key commented out, or `--set timesteps=`, failed "config key
    'timesteps' must be a mapping", where curation's configuration reads it as the section's
    defaults; a VAE's empty `data:` section keeps the VAE's crop mode."""
    tree = dit_tree(tmp_path)
    tree["timesteps"] = None
    from_yaml = load_train_config(DitTrainConfig, data=tree, check_files=False)
    from_set = load_train_config(
        DitTrainConfig, data=dit_tree(tmp_path), overrides=["timesteps="], check_files=False
    )
    default = load_train_config(DitTrainConfig, data=dit_tree(tmp_path), check_files=False)
    assert from_yaml.timesteps == from_set.timesteps == default.timesteps
    tree = vae_tree(tmp_path)
    tree["data"] = None
    with pytest.raises(TrainConfigError, match=r"data\.root"):  # required, not "a mapping"
        load_train_config(VaeTrainConfig, data=tree, check_files=False)
    cfg = load_train_config(
        VaeTrainConfig, data=tree, overrides=[f"data.root={tmp_path / 'curated'}"],
        check_files=False,
    )  # fmt: skip
    assert cfg.data.mode == "crop"


@pytest.mark.parametrize(
    ("cls", "key"),
    [(DitTrainConfig, "loop.output_dir"), (DitTrainConfig, "loop.resume"),
     (DitTrainConfig, "text.cache"), (DitTrainConfig, "model.vae"),
     (VaeTrainConfig, "loop.output_dir"), (VaeTrainConfig, "loss.lpips_weights")],
)  # fmt: skip
def test_a_url_where_a_local_path_is_read_is_refused(tmp_path: Path, cls: type, key: str) -> None:
    """`loop.output_dir: s3://bucket/runs` was accepted, and the checkpoints went to a local
    folder named `s3:`; only `data.root` is read through fsspec."""
    tree = dit_tree(tmp_path) if cls is DitTrainConfig else vae_tree(tmp_path)
    with pytest.raises(TrainConfigError, match=rf"'{re.escape(key)}' must be a local path, got "
                                               r"'s3://bucket/runs'"):  # fmt: skip
        load_train_config(cls, data=tree, overrides=[f"{key}=s3://bucket/runs"],
                          check_files=False)  # fmt: skip
    cfg = load_train_config(cls, data=tree, overrides=["data.root=s3://bucket/run"],
                            check_files=False)  # fmt: skip
    assert cfg.data.root == "s3://bucket/run"


def test_a_stopped_run_says_how_to_resume_it(tmp_path: Path) -> None:
    """With `loop.resume` naming a checkpoint, "rerun the same command" was refused by the
    run's own newer checkpoints (or, in a new output_dir, as another run's)."""
    from pipelines.train import _rerun

    for resume, words in (("auto", "rerun the same command"),
                          ("never", "rerun the same command with --set loop.resume=auto"),
                          (str(tmp_path / "ckpt" / "step-00000006"),
                           "rerun the same command with --set loop.resume=auto")):  # fmt: skip
        cfg = load_train_config(DitTrainConfig, data=dit_tree(tmp_path),
                                overrides=[f"loop.resume={resume}"], check_files=False)  # fmt: skip
        assert _rerun(cfg) == words
