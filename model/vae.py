"""F16 variant of Flux's 16-channel AutoencoderKL, with exact partitioned decoding.

The F16 VAE is Flux's F8 VAE with two changes that add no weights: the encoder's ``conv_in``
has stride 2, and the decoder upsamples ×2 (nearest) right before ``conv_out``. A 4096² image
becomes a 256×256×16 latent. Converting an F8 checkpoint is therefore a config change
(:meth:`AutoencoderKLF16.from_f8`); an F16 checkpoint in diffusers layout (config key
``stride: 2``, as UltraFlux ships it) loads with ``from_pretrained``.

Tiled decoding (``enable_tiling()``) runs the decoder's full-resolution stages in horizontal
stripes: each convolution reads its stripe plus a one-row halo, and every GroupNorm uses
statistics gathered over the whole feature map first. The result is the untiled decode (up to
float summation order), so there are no seams, while memory holds about three feature maps of
the widest stage instead of all of a block's temporaries. The low-resolution start (``conv_in``
and the mid block, whose attention is global) runs whole.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from diffusers.configuration_utils import register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.upsampling import Upsample2D
from torch import nn

from model.files import describe_missing, missing_shards

FLUX_VAE_CONFIG: dict = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 16,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}

# Elements of one stripe tensor during partitioned decoding (128 MiB in bf16).
DEFAULT_PARTITION_ELEMENTS = 1 << 26


class UpsampleConv2d(nn.Conv2d):
    """A Conv2d that first upsamples its input by an integer factor (nearest).

    Its parameters are named as a plain Conv2d's, so F8 weights load unchanged.
    """

    def __init__(self, conv: nn.Conv2d, factor: int) -> None:
        super().__init__(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            bias=conv.bias is not None,
        )
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Upsample ``x`` (B, C, H, W) to (B, C, fH, fW), then convolve."""
        if self.factor != 1:
            x = F.interpolate(x, scale_factor=self.factor, mode="nearest")
        return super().forward(x)


class AutoencoderKLF16(AutoencoderKL):
    """Flux's AutoencoderKL with a ``stride``-times larger spatial compression (default F16).

    Args:
        in_channels: Image channels.
        out_channels: Output image channels.
        down_block_types: Encoder block types.
        up_block_types: Decoder block types.
        block_out_channels: Channels per block.
        layers_per_block: ResNet layers per block.
        act_fn: Activation.
        latent_channels: Latent channels (16 for Flux).
        norm_num_groups: GroupNorm groups.
        sample_size: Nominal image size (sets the tiling threshold).
        scaling_factor: Latent scale (Flux: 0.3611).
        shift_factor: Latent shift (Flux: 0.1159).
        latents_mean: Unused by Flux; kept for config compatibility.
        latents_std: Unused by Flux; kept for config compatibility.
        force_upcast: See ``AutoencoderKL``.
        use_quant_conv: Whether a 1×1 quant conv follows the encoder.
        use_post_quant_conv: Whether a 1×1 conv precedes the decoder.
        mid_block_add_attention: Whether the mid blocks have self-attention.
        stride: Extra spatial factor: encoder ``conv_in`` stride and decoder upsample before
            ``conv_out``. 2 makes an F8 VAE F16; 1 is the plain F8 VAE.
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",),
        up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",),
        block_out_channels: tuple[int, ...] = (64,),
        layers_per_block: int = 1,
        act_fn: str = "silu",
        latent_channels: int = 4,
        norm_num_groups: int = 32,
        sample_size: int = 32,
        scaling_factor: float = 0.18215,
        shift_factor: float | None = None,
        latents_mean: tuple[float, ...] | None = None,
        latents_std: tuple[float, ...] | None = None,
        force_upcast: bool = True,
        use_quant_conv: bool = True,
        use_post_quant_conv: bool = True,
        mid_block_add_attention: bool = True,
        stride: int = 2,
    ) -> None:
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        super().__init__(
            in_channels=in_channels,
            out_channels=out_channels,
            down_block_types=down_block_types,
            up_block_types=up_block_types,
            block_out_channels=block_out_channels,
            layers_per_block=layers_per_block,
            act_fn=act_fn,
            latent_channels=latent_channels,
            norm_num_groups=norm_num_groups,
            sample_size=sample_size,
            scaling_factor=scaling_factor,
            shift_factor=shift_factor,
            latents_mean=latents_mean,
            latents_std=latents_std,
            force_upcast=force_upcast,
            use_quant_conv=use_quant_conv,
            use_post_quant_conv=use_post_quant_conv,
            mid_block_add_attention=mid_block_add_attention,
        )
        conv_in = self.encoder.conv_in
        self.encoder.conv_in = nn.Conv2d(
            conv_in.in_channels,
            conv_in.out_channels,
            conv_in.kernel_size,
            stride=stride,
            padding=conv_in.padding,
        )
        self.decoder.conv_out = UpsampleConv2d(self.decoder.conv_out, stride)
        # Used by the parent's blended tiled *encode*; decoding is partitioned at any size.
        self.tile_latent_min_size = max(1, int(sample_size) // self.spatial_scale_factor)
        self.partition_elements = DEFAULT_PARTITION_ELEMENTS

    @property
    def spatial_scale_factor(self) -> int:
        """Image pixels per latent pixel along one side (16 for the F16 VAE)."""
        return 2 ** (len(self.config.block_out_channels) - 1) * self.config.stride

    @classmethod
    def from_f8(
        cls, source: str | Path | AutoencoderKL, *, stride: int = 2, **load_kwargs
    ) -> AutoencoderKLF16:
        """Build the F16 VAE from an F8 Flux VAE (a folder in diffusers layout or a model).

        The weights are copied unchanged; only the encoder stride and the decoder's final
        upsample change, so no training is involved.
        """
        if isinstance(source, AutoencoderKL):
            f8 = source
        else:
            folder = Path(source)
            _require_weights(folder)
            f8 = AutoencoderKL.from_pretrained(folder, **load_kwargs)
        config = {k: v for k, v in f8.config.items() if not k.startswith("_")}
        config["stride"] = stride
        f16 = cls(**config)
        f16.load_state_dict(f8.state_dict(), strict=True)
        return f16 if f16.dtype == f8.dtype else f16.to(dtype=f8.dtype)

    def set_partition_elements(self, num_elements: int) -> None:
        """Bound one stripe tensor of the partitioned decode to about ``num_elements``."""
        if num_elements <= 0:
            raise ValueError("num_elements must be positive")
        self.partition_elements = num_elements

    def _decode(self, z: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple:
        """Untiled decode, or the partitioned decode at any size once tiling is enabled."""
        if self.use_tiling:
            return self.tiled_decode(z, return_dict=return_dict)
        return super()._decode(z, return_dict=return_dict)

    def tiled_decode(self, z: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple:
        """Decode ``z`` (B, C, h, w) to (B, 3, h·f, w·f) stripe by stripe, equal to ``decode``."""
        dec = self.decoder
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        x = dec.mid_block(dec.conv_in(z), None)
        budget = self.partition_elements
        for up_block in dec.up_blocks:
            for resnet in up_block.resnets:
                x = _resnet_by_rows(resnet, x, budget)
            for upsampler in up_block.upsamplers or []:
                x = _upsample_by_rows(upsampler, x, budget)
        x = _output_by_rows(dec.conv_norm_out, dec.conv_act, dec.conv_out, x, budget)
        return DecoderOutput(sample=x) if return_dict else (x,)


def _require_weights(folder: Path) -> None:
    """Raise one clear error when a model folder lacks its config or weights."""
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{folder / 'config.json'} not found: point to a VAE folder in diffusers layout "
            "(config.json + diffusion_pytorch_model.safetensors), e.g. the 'vae' subfolder of "
            "FLUX.1-dev copied to this machine"
        )
    if not any(folder.glob("diffusion_pytorch_model*.safetensors")) and not any(
        folder.glob("diffusion_pytorch_model*.bin")
    ):
        raise FileNotFoundError(
            f"no weights in {folder}: expected diffusion_pytorch_model.safetensors there; copy "
            "the VAE weights of the checkpoint into that folder"
        )
    missing = missing_shards(folder)
    if missing:
        raise FileNotFoundError(describe_missing(folder, missing))


# ----------------------------------------------------------------------------------------------
# Partitioned (stripe-wise) decoder stages. Every stage reads a full feature map and writes a
# full feature map; inside, only one stripe of temporaries is alive at a time.


def _rows_per_stripe(channels: int, width: int, budget: int) -> int:
    return max(1, budget // max(1, channels * width))


def _group_stats(norm: nn.GroupNorm, x: torch.Tensor, rows: int) -> tuple[torch.Tensor, ...]:
    """Per-channel scale and shift that apply ``norm`` with statistics of the whole map.

    Mean and variance per (sample, group) are computed stripe by stripe and merged exactly
    (Chan et al.'s pairwise update, in float64), then folded with the affine weights.

    Returns:
        ``(scale, shift)``, each (B, C, 1, 1) float32: ``norm(x) == x * scale + shift``.
    """
    num_b, num_c, height, _ = x.shape
    num_g = norm.num_groups
    count = 0.0
    mean = torch.zeros(num_b, num_g, dtype=torch.float64, device=x.device)
    m2 = torch.zeros_like(mean)
    for r0 in range(0, height, rows):
        xs = x[:, :, r0 : r0 + rows].float().reshape(num_b, num_g, -1)
        var_s, mean_s = torch.var_mean(xs, dim=-1, correction=0)
        n_s = xs.shape[-1]
        delta = mean_s.double() - mean
        total = count + n_s
        mean = mean + delta * (n_s / total)
        m2 = m2 + var_s.double() * n_s + delta.square() * (count * n_s / total)
        count = total
    rstd = torch.rsqrt(m2 / count + norm.eps).float()
    rstd_c = rstd.repeat_interleave(num_c // num_g, dim=1)
    mean_c = mean.float().repeat_interleave(num_c // num_g, dim=1)
    weight = norm.weight.float() if norm.affine else torch.ones(num_c, device=x.device)
    bias = norm.bias.float() if norm.affine else torch.zeros(num_c, device=x.device)
    scale = rstd_c * weight
    shift = bias - mean_c * scale
    return scale[:, :, None, None], shift[:, :, None, None]


def _norm_act(
    act: Callable[[torch.Tensor], torch.Tensor],
    xs: torch.Tensor,
    stats: tuple[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """GroupNorm with precomputed global statistics (see :func:`_group_stats`), then ``act``."""
    scale, shift = stats
    return act(torch.addcmul(shift, xs.float(), scale).to(xs.dtype))


def _conv_rows(
    conv: nn.Conv2d,
    get_rows: Callable[[int, int], torch.Tensor],
    height: int,
    r0: int,
    r1: int,
) -> torch.Tensor:
    """Output rows ``[r0, r1)`` of a stride-1 ``conv`` whose input rows come from ``get_rows``.

    The input stripe carries ``padding`` halo rows where they exist; the convolution zero-pads
    the stripe at both ends, which is exact at the image border, and the rows next to a cut
    halo are cropped away.
    """
    assert conv.stride == (1, 1) and conv.dilation == (1, 1)
    pad_h = conv.padding[0]
    lo, hi = max(r0 - pad_h, 0), min(r1 + pad_h, height)
    y = F.conv2d(get_rows(lo, hi), conv.weight, conv.bias, padding=conv.padding)
    return y[:, :, r0 - lo : r1 - lo]


def _resnet_by_rows(resnet: ResnetBlock2D, x: torch.Tensor, budget: int) -> torch.Tensor:
    """``resnet(x, None)`` for a decoder ResnetBlock2D (no time embedding, no resampling)."""
    assert resnet.upsample is None and resnet.downsample is None
    assert resnet.time_emb_proj is None
    num_b, _, height, width = x.shape
    rows = _rows_per_stripe(max(x.shape[1], resnet.conv1.out_channels), width, budget)
    act = resnet.nonlinearity

    stats1 = _group_stats(resnet.norm1, x, rows)
    h = x.new_empty(num_b, resnet.conv1.out_channels, height, width)
    for r0 in range(0, height, rows):
        r1 = min(r0 + rows, height)
        h[:, :, r0:r1] = _conv_rows(
            resnet.conv1,
            lambda a, b: _norm_act(act, x[:, :, a:b], stats1),
            height,
            r0,
            r1,
        )

    stats2 = _group_stats(resnet.norm2, h, rows)
    out = x.new_empty(num_b, resnet.conv2.out_channels, height, width)
    for r0 in range(0, height, rows):
        r1 = min(r0 + rows, height)
        y = _conv_rows(
            resnet.conv2,
            lambda a, b: _norm_act(act, h[:, :, a:b], stats2),
            height,
            r0,
            r1,
        )
        shortcut = x[:, :, r0:r1]
        if resnet.conv_shortcut is not None:
            shortcut = resnet.conv_shortcut(shortcut)
        out[:, :, r0:r1] = (shortcut + y) / resnet.output_scale_factor
    return out


def _nearest_rows(x: torch.Tensor, factor: int, a: int, b: int) -> torch.Tensor:
    """Rows ``[a, b)`` of ``x`` upsampled ``factor``× (nearest), computed from source rows only."""
    src = x[:, :, a // factor : math.ceil(b / factor)]
    if factor != 1:
        src = F.interpolate(src, scale_factor=factor, mode="nearest")
    offset = a - (a // factor) * factor
    return src[:, :, offset : offset + (b - a)]


def _upsample_by_rows(upsampler: Upsample2D, x: torch.Tensor, budget: int) -> torch.Tensor:
    """``upsampler(x)`` for diffusers' nearest ×2 + 3×3 conv Upsample2D."""
    assert upsampler.use_conv and upsampler.interpolate and not upsampler.use_conv_transpose
    assert upsampler.norm is None
    conv = upsampler.conv
    num_b, _, height, width = x.shape
    out_h, out_w = 2 * height, 2 * width
    rows = _rows_per_stripe(max(x.shape[1], conv.out_channels), out_w, budget)
    out = x.new_empty(num_b, conv.out_channels, out_h, out_w)
    for r0 in range(0, out_h, rows):
        r1 = min(r0 + rows, out_h)
        out[:, :, r0:r1] = _conv_rows(conv, lambda a, b: _nearest_rows(x, 2, a, b), out_h, r0, r1)
    return out


def _output_by_rows(
    norm: nn.GroupNorm,
    act: Callable[[torch.Tensor], torch.Tensor],
    conv_out: nn.Conv2d,
    x: torch.Tensor,
    budget: int,
) -> torch.Tensor:
    """``conv_out(upsample(act(norm(x))))``; nearest upsampling commutes with norm and act."""
    factor = conv_out.factor if isinstance(conv_out, UpsampleConv2d) else 1
    num_b, num_c, height, width = x.shape
    out_h, out_w = factor * height, factor * width
    rows = _rows_per_stripe(num_c, out_w, budget)
    stats = _group_stats(norm, x, _rows_per_stripe(num_c, width, budget))

    def get_rows(a: int, b: int) -> torch.Tensor:
        src_lo, src_hi = a // factor, math.ceil(b / factor)
        ys = _norm_act(act, x[:, :, src_lo:src_hi], stats)
        if factor != 1:
            ys = F.interpolate(ys, scale_factor=factor, mode="nearest")
        offset = a - src_lo * factor
        return ys[:, :, offset : offset + (b - a)]

    out = x.new_empty(num_b, conv_out.out_channels, out_h, out_w)
    for r0 in range(0, out_h, rows):
        r1 = min(r0 + rows, out_h)
        out[:, :, r0:r1] = _conv_rows(conv_out, get_rows, out_h, r0, r1)
    return out
