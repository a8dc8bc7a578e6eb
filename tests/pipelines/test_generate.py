"""End-to-end tests of the UltraFlux pipeline and ``native4k generate`` with tiny random models."""

import argparse
import math
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from PIL import Image
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    PreTrainedTokenizerFast,
    T5Config,
    T5EncoderModel,
)

from model.pipeline import (
    FLUX_SCHEDULER_CONFIG,
    UltraFluxPipeline,
    pack_latents,
    resolution_shift,
    unpack_latents,
)
from model.transformer import UltraFluxTransformer2DModel
from model.vae import AutoencoderKLF16
from pipelines import generate

TEXT_DIM, POOLED_DIM = 32, 16
FLUX_KEYS = (
    "num_layers",
    "num_single_layers",
    "attention_head_dim",
    "num_attention_heads",
    "joint_attention_dim",
    "pooled_projection_dim",
    "in_channels",
    "axes_dims_rope",
    "guidance_embeds",
)
VAE = {
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [4, 4, 4, 4],
    "layers_per_block": 1,
    "latent_channels": 16,
    "norm_num_groups": 2,
    "sample_size": 256,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "mid_block_add_attention": False,
}


def tiny_tokenizer(max_length: int) -> PreTrainedTokenizerFast:
    words = ["a", "photo", "of", "fjord", "at", "dawn", "mountain", "lake", "sky"]
    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        eos_token="[EOS]",
        model_max_length=max_length,
    )


def save_tiny_model(root: Path, *, text_encoders: bool) -> None:
    """A complete model folder in diffusers layout, random weights."""
    torch.manual_seed(0)
    UltraFluxTransformer2DModel(
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TEXT_DIM,
        pooled_projection_dim=POOLED_DIM,
        in_channels=64,
        axes_dims_rope=(4, 6, 6),
        guidance_embeds=True,
    ).save_pretrained(root / "transformer")
    AutoencoderKLF16(**VAE).save_pretrained(root / "vae")
    FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG).save_pretrained(root / "scheduler")
    if text_encoders:
        clip = CLIPTextConfig(
            vocab_size=16,
            hidden_size=POOLED_DIM,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=77,
            projection_dim=POOLED_DIM,
        )
        CLIPTextModel(clip).save_pretrained(root / "text_encoder")
        tiny_tokenizer(77).save_pretrained(root / "tokenizer")
        t5 = T5Config(vocab_size=16, d_model=TEXT_DIM, d_kv=8, d_ff=64, num_layers=1, num_heads=2)
        T5EncoderModel(t5).save_pretrained(root / "text_encoder_2")
        tiny_tokenizer(512).save_pretrained(root / "tokenizer_2")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ultraflux_tiny")
    save_tiny_model(root, text_encoders=True)
    return root


@pytest.fixture(scope="module")
def embeds_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("embeds") / "embeds.pt"
    g = torch.Generator().manual_seed(1)
    torch.save(
        {
            "prompt_embeds": torch.randn(1, 24, TEXT_DIM, generator=g),
            "pooled_prompt_embeds": torch.randn(1, POOLED_DIM, generator=g),
        },
        path,
    )
    return path


def cli(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    generate.add_arguments(parser)
    return parser.parse_args(argv)


@pytest.mark.parametrize(
    ("size", "use_text_encoders", "ext"),
    [("5440x3072", False, "jpg"), ("3072x5440", False, "jpg"), ("4096x4096", True, "png")],
    ids=["landscape", "portrait", "square"],
)
def test_generate_writes_an_image_of_the_bucket_size(
    model_dir: Path,
    embeds_file: Path,
    tmp_path: Path,
    size: str,
    use_text_encoders: bool,
    ext: str,
) -> None:
    out = tmp_path / f"img.{ext}"
    prompt = ["--prompt", "a fjord at dawn"] if use_text_encoders else []
    embeds = [] if use_text_encoders else ["--prompt-embeds", str(embeds_file)]
    argv = ["--model", str(model_dir), "--size", size, "--steps", "1", "--out", str(out)]
    argv += ["--dtype", "fp32", "--device", "cpu", *prompt, *embeds]
    if use_text_encoders:  # through the real `native4k generate` entry point
        from pipelines.cli import main as native4k_main

        assert native4k_main(["generate", *argv]) == 0
    else:
        assert generate.run(cli(argv)) == 0
    width, height = (int(v) for v in size.split("x"))
    with Image.open(out) as image:
        assert image.size == (width, height)
        assert image.mode == "RGB"
        small = image.resize((64, 64))
    pixels = torch.frombuffer(bytearray(small.tobytes()), dtype=torch.uint8).float()
    assert pixels.std() > 0  # a real decode, not a constant fill


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("device", [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs CUDA")]),
])  # fmt: skip
def test_fp8_layers_return_the_dtype_asked_for(
    model_dir: Path, embeds_file: Path, tmp_path: Path, dtype: str, device: str
) -> None:
    """`--fp8` made every converted layer return bf16 whatever `--dtype` said: fp16 crashed
    with a dtype mismatch at the output projection, fp32 silently ran its blocks in bf16."""
    from model.fp8 import Fp8Linear

    seen: set[torch.dtype] = set()

    def record(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        if isinstance(module, Fp8Linear):
            seen.add(output.dtype)

    handle = torch.nn.modules.module.register_module_forward_hook(record)
    out = tmp_path / "img.png"
    argv = ["--model", str(model_dir), "--size", "1024x1024", "--steps", "1", "--out", str(out)]
    argv += ["--dtype", dtype, "--device", device, "--fp8", "--prompt-embeds", str(embeds_file)]
    try:
        assert generate.run(cli(argv)) == 0
    finally:
        handle.remove()
    assert seen == {getattr(torch, generate._DTYPES[dtype])}
    with Image.open(out) as image:
        assert image.size == (1024, 1024)


def test_pipeline_without_text_encoders_and_determinism(tmp_path: Path) -> None:
    save_tiny_model(tmp_path, text_encoders=False)
    pipe = UltraFluxPipeline.from_folder(tmp_path, torch_dtype=torch.float32)
    assert pipe.text_encoder is None and pipe.vae_scale_factor == 32
    g = torch.Generator().manual_seed(2)
    embeds = {
        "prompt_embeds": torch.randn(1, 8, TEXT_DIM, generator=g),
        "pooled_prompt_embeds": torch.randn(1, POOLED_DIM, generator=g),
    }

    def sample(seed: int, guidance: float) -> torch.Tensor:
        return pipe(
            height=320,
            width=192,
            num_inference_steps=3,
            guidance_scale=guidance,
            generator=torch.Generator().manual_seed(seed),
            output_type="latent",
            **embeds,
        )

    latents = sample(0, 4.0)
    assert latents.shape == (1, 16, 20, 12)
    assert torch.equal(latents, sample(0, 4.0))
    assert not torch.allclose(latents, sample(1, 4.0))
    assert not torch.allclose(latents, sample(0, 1.0))  # guidance is embedded and used
    # save_pretrained writes diffusers layout (model_index.json + subfolders) that loads back.
    pipe.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "model_index.json").is_file()
    pipe = UltraFluxPipeline.from_folder(tmp_path / "saved", torch_dtype=torch.float32)
    assert torch.equal(latents, sample(0, 4.0))
    with pytest.raises(ValueError, match="text_encoder"):
        pipe("a prompt", height=64, width=64, num_inference_steps=1)
    with pytest.raises(ValueError, match="multiples of 32"):
        pipe(height=100, width=64, num_inference_steps=1, **embeds)


def test_resolution_dependent_shift(model_dir: Path) -> None:
    pipe = UltraFluxPipeline.from_folder(
        model_dir, torch_dtype=torch.float32, load_text_encoders=False
    )
    num_tokens = 16384  # 4096² px
    mu = resolution_shift(num_tokens, pipe.scheduler.config)
    assert mu == pytest.approx(0.5 + (1.15 - 0.5) / (4096 - 256) * (num_tokens - 256))
    timesteps = pipe.timesteps_for(10, num_tokens, None, torch.device("cpu"))
    sigma = 0.9  # second of linspace(1, 0.1, 10)
    shifted = math.exp(mu) / (math.exp(mu) + (1 / sigma - 1))
    assert timesteps[1].item() == pytest.approx(1000 * shifted, rel=1e-5)
    small = pipe.timesteps_for(10, 1024, None, torch.device("cpu"))
    assert small[1] < timesteps[1]  # fewer tokens, less shift
    fixed = pipe.timesteps_for(10, num_tokens, 4.0, torch.device("cpu"))
    assert fixed[1].item() == pytest.approx(1000 * 4 * sigma / (1 + 3 * sigma), rel=1e-5)
    # A fixed shift is for that run only: the next run without one shifts by resolution again,
    # and the scheduler config the pipeline saves keeps its dynamic shifting.
    assert torch.equal(pipe.timesteps_for(10, num_tokens, None, torch.device("cpu")), timesteps)
    assert pipe.scheduler.config.use_dynamic_shifting
    # A shift of 0 or below gave NaN or negative timesteps, and the run saved a NaN image.
    for bad in (0.0, -1.0, math.nan):
        with pytest.raises(ValueError, match="shift must be a positive number"):
            pipe.timesteps_for(10, num_tokens, bad, torch.device("cpu"))


def test_pack_unpack_round_trip() -> None:
    latents = torch.randn(2, 16, 6, 10)
    tokens = pack_latents(latents)
    assert tokens.shape == (2, 15, 64)
    assert torch.equal(unpack_latents(tokens, 3, 5), latents)
    # Token (row 1, col 2) holds the 2×2 latent patch at rows 2..3, cols 4..5.
    assert torch.equal(tokens[0, 1 * 5 + 2].reshape(16, 2, 2), latents[0, :, 2:4, 4:6])


def test_missing_files_give_one_clear_error(
    tmp_path: Path, embeds_file: Path, capsys: pytest.CaptureFixture
) -> None:
    save_tiny_model(tmp_path, text_encoders=False)
    (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    args = cli(["--model", str(tmp_path), "--prompt-embeds", str(embeds_file), "--out", "x.png"])
    assert generate.run(args) == 1
    err = capsys.readouterr().err
    assert "transformer" in err and "diffusion_pytorch_model.safetensors" in err
    args = cli(["--model", str(tmp_path), "--prompt", "a lake", "--out", "x.png"])
    (tmp_path / "transformer" / "config.json").unlink()
    assert generate.run(args) == 1
    assert "config.json" in capsys.readouterr().err


def test_a_transformer_missing_one_shard_is_one_clear_error(
    tmp_path: Path, embeds_file: Path, capsys: pytest.CaptureFixture
) -> None:
    """An interrupted copy of a sharded transformer failed inside diffusers' loader; the
    folder is checked against its index first and the missing shard is named."""
    save_tiny_model(tmp_path, text_encoders=False)
    folder = tmp_path / "transformer"
    model = UltraFluxTransformer2DModel.from_pretrained(folder)
    for f in folder.glob("diffusion_pytorch_model*"):
        f.unlink()
    model.save_pretrained(folder, max_shard_size="50KB")
    shards = sorted(folder.glob("diffusion_pytorch_model-*.safetensors"))
    assert len(shards) >= 2
    shards[0].unlink()
    args = cli(["--model", str(tmp_path), "--prompt-embeds", str(embeds_file), "--out", "x.png"])
    assert generate.run(args) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("native4k: ") and "\n" not in err, err
    assert f"names {shards[0].name}" in err and "not there" in err, err


def test_f8_vae_folder_is_converted_on_load(tmp_path: Path) -> None:
    save_tiny_model(tmp_path, text_encoders=False)
    f8_config = {k: v for k, v in VAE.items()}
    AutoencoderKL(**f8_config).save_pretrained(tmp_path / "vae")
    pipe = UltraFluxPipeline.from_folder(tmp_path, torch_dtype=torch.float32)
    assert isinstance(pipe.vae, AutoencoderKLF16) and pipe.vae.config.stride == 2
    assert pipe.vae_scale_factor == 32


def test_released_flux_layout_transformer_runs_the_released_rope(tmp_path: Path) -> None:
    save_tiny_model(tmp_path, text_encoders=False)
    ours = UltraFluxTransformer2DModel.from_pretrained(tmp_path / "transformer")
    flux = FluxTransformer2DModel(**{k: v for k, v in ours.config.items() if k in FLUX_KEYS})
    flux.load_state_dict(ours.state_dict())
    flux.save_pretrained(tmp_path / "transformer")
    pipe = UltraFluxPipeline.from_folder(tmp_path, torch_dtype=torch.float32)
    assert pipe.transformer.config.rope_method == "ultraflux_released"
    pipe = UltraFluxPipeline.from_folder(tmp_path, torch_dtype=torch.float32, rope_method="base")
    assert pipe.transformer.pos_embed.method == "base"


def test_size_argument_is_validated() -> None:
    with pytest.raises(SystemExit):
        cli(["--model", "m", "--out", "o.png", "--size", "5440x3000"])
    assert generate.parse_size("6336x2624") == (6336, 2624)
    for bad in ("0", "-2", "nan", "fast"):
        with pytest.raises(SystemExit):
            cli(["--model", "m", "--out", "o.png", "--shift", bad])
    assert cli(["--model", "m", "--out", "o.png", "--shift", "3"]).shift == 3.0


def test_a_bad_output_or_count_is_refused_before_the_models_load(
    tmp_path: Path, embeds_file: Path, capsys: pytest.CaptureFixture
) -> None:
    """With a real model, a bad --out found after sampling would lose the whole run."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    base = ["--model", str(tmp_path / "no-model"), "--prompt-embeds", str(embeds_file)]
    for out, words in ((tmp_path / "z.xyz", ".xyz is not an image format"),
                       (tmp_path / "noext", "no extension is not an image format"),
                       (tmp_path, "is a folder"),
                       (afile / "x.png", "is a file")):  # fmt: skip
        assert generate.run(cli([*base, "--out", str(out)])) == 2
        assert words in capsys.readouterr().err
    for flag in ("--steps", "--max-sequence-length"):
        with pytest.raises(SystemExit):
            cli([*base, "--out", "x.png", flag, "0"])
        assert "must be at least 1" in capsys.readouterr().err


def test_an_unusable_model_folder_or_embeddings_file_is_one_line(
    tmp_path: Path, embeds_file: Path, capsys: pytest.CaptureFixture
) -> None:
    save_tiny_model(tmp_path, text_encoders=False)
    out = tmp_path / "img.png"

    def run(embeds: Path = embeds_file) -> str:
        args = ["--model", str(tmp_path), "--prompt-embeds", str(embeds), "--out", str(out)]
        assert generate.run(cli([*args, "--dtype", "fp32", "--device", "cpu", "--steps", "1",
                                 "--size", "64x64"])) == 1  # fmt: skip
        return capsys.readouterr().err.strip()

    garbage = tmp_path / "garbage.pt"
    garbage.write_text("hello")
    assert "is not a torch file" in run(garbage)
    wide = tmp_path / "wide.pt"
    torch.save({"prompt_embeds": torch.zeros(1, 4, 4096),
                "pooled_prompt_embeds": torch.zeros(1, 768)}, wide)  # fmt: skip
    assert f"expected (1, L, {TEXT_DIM})" in run(wide)
    weights = tmp_path / "transformer" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    save_file({k: v for k, v in tensors.items() if k != "context_embedder.bias"}, weights)
    assert "lack 1 of the model's tensors (e.g. context_embedder.bias)" in run()
    shutil.rmtree(tmp_path / "transformer")
    shutil.copytree(tmp_path / "vae", tmp_path / "transformer")
    assert "holds a AutoencoderKLF16, not a transformer" in run()
    assert not out.exists()


def test_the_image_replaces_an_existing_file_atomically(
    model_dir: Path, embeds_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "img.webp"
    out.write_bytes(b"an older image")
    argv = ["--model", str(model_dir), "--prompt-embeds", str(embeds_file), "--out", str(out),
            "--dtype", "fp32", "--device", "cpu", "--steps", "1", "--size", "64x64"]  # fmt: skip
    assert generate.run(cli(argv)) == 0
    with Image.open(out) as image:
        assert image.format == "WEBP" and image.size == (64, 64)
    assert [p.name for p in tmp_path.iterdir()] == ["img.webp"]  # no temporary file left


@pytest.mark.parametrize(
    "flag,value,words",
    [
        ("--rope-method", "bogus", "invalid choice: 'bogus' (choose from"),
        ("--rope-method", "", "invalid choice: ''"),
        ("--guidance", "nan", "must be a finite number"),
        ("--guidance", "inf", "must be a finite number"),
        ("--seed", str(2**64), "must be an integer in"),
        ("--seed", "-1" + "0" * 20, "must be an integer in"),
        ("--steps", "-3", "must be at least 1"),
        ("--dtype", "fp8", "invalid choice: 'fp8'"),
    ],
)
def test_a_bad_option_is_a_usage_error_before_any_model_loads(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture, flag: str, value: str, words: str,
) -> None:
    """`native4k generate --rope-method bogus` loaded the whole model, then failed with exit 1
    (a bad --seed or a NaN --guidance got as far, or sampled a NaN image): every bad option
    value is argparse's usage error, exit 2, before anything loads."""
    from pipelines.cli import main

    def no_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(UltraFluxPipeline, "from_folder", no_load)
    argv = ["generate", "--model", str(model_dir), "--prompt", "a lake",
            "--out", str(tmp_path / "x.png"), f"{flag}={value}"]  # fmt: skip
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and words in err, err
    assert err.strip().splitlines()[-1].startswith("native4k generate: error: argument "), err
    if flag == "--rope-method":
        from model.rope import ROPE_METHODS

        assert all(repr(m) in err for m in ROPE_METHODS), err


@pytest.mark.parametrize("device", ["xpu", "mps", f"cuda:{max(torch.cuda.device_count(), 1) + 7}"])
def test_an_unusable_device_is_refused_before_the_model_loads(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture, device: str,
) -> None:
    """`--device cuda:8` on a host with fewer GPUs (or a backend this torch build lacks) failed
    only after the whole model had loaded: it is one line, exit 2, before anything loads."""
    def no_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(UltraFluxPipeline, "from_folder", no_load)
    argv = ["--model", str(model_dir), "--prompt", "a lake", "--out", str(tmp_path / "x.png"),
            "--device", device]  # fmt: skip
    assert generate.run(cli(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"native4k: --device {device}: ") and "\n" not in err, err
    assert not (tmp_path / "x.png").exists()


def test_every_rope_method_is_an_allowed_value() -> None:
    from model.rope import ROPE_METHODS

    base = ["--model", "m", "--out", "o.png"]
    for method in ROPE_METHODS:
        assert cli([*base, "--rope-method", method]).rope_method == method
    assert cli(base).rope_method is None
    assert cli([*base, "--seed", "-5"]).seed == -5  # torch takes it


def test_a_size_past_the_resolution_shift_is_refused_before_the_models_load(
    model_dir: Path, embeds_file: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    """65536² gave diffusers' OverflowError traceback; 32768² sampled NaN at every step and
    16384² never denoised (every shifted sigma but the last at 1.0)."""
    from model import pipeline as mp

    pipe = UltraFluxPipeline.from_folder(model_dir, torch_dtype=torch.float32,
                                         load_text_encoders=False)  # fmt: skip
    cpu = torch.device("cpu")
    for side in (8192, 16384, 65536):
        tokens = (side // 32) ** 2
        with pytest.raises(ValueError, match=rf"{tokens} image tokens: .*give a fixed --shift"):
            pipe.timesteps_for(28, tokens, None, cpu)
        assert torch.isfinite(pipe.timesteps_for(28, tokens, 3.0, cpu)).all()  # a fixed shift
    limit = mp.MAX_RESOLUTION_SHIFT  # the largest square below it still samples
    side = 32 * int(math.sqrt(256 + (limit - 0.5) * 3840 / 0.65))
    assert torch.isfinite(pipe.timesteps_for(28, (side // 32) ** 2, None, cpu)).all()

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(UltraFluxPipeline, "from_folder", no_load)
    base = ["--model", str(model_dir), "--prompt-embeds", str(embeds_file),
            "--out", str(tmp_path / "a.png")]  # fmt: skip
    assert generate.run(cli([*base, "--size", "65536x65536", "--steps", "1"])) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("native4k: 65536x65536 is 4194304 image tokens")


def test_the_shift_bound_reads_the_schedulers_own_settings() -> None:
    """A linear time shift takes mu as the shift itself (no exp): no bound of exp(mu) applies;
    a flat line of shifts (base == max) still gives the one clear error, not a ZeroDivision."""
    from model.pipeline import check_resolution_shift

    flux = {"base_image_seq_len": 256, "max_image_seq_len": 4096, "base_shift": 0.5,
            "max_shift": 1.15}  # fmt: skip
    assert check_resolution_shift(16384, flux) == pytest.approx(3.23, abs=0.01)  # 4096²
    with pytest.raises(ValueError, match=r"at most about \d+ tokens"):
        check_resolution_shift(65536, flux)
    assert check_resolution_shift(65536, {**flux, "time_shift_type": "linear"}) > 6.9
    flat = {**flux, "base_shift": 8.0, "max_shift": 8.0}
    with pytest.raises(ValueError, match=r"give a fixed --shift, or a smaller size"):
        check_resolution_shift(1024, flat)
