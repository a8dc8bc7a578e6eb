"""Cheap heads over one L2-normalised image embedding: LAION's aesthetic MLP, a safety MLP.

Both load from local state-dict files; the layouts are checked so that a wrong file fails
with a message naming it, not with a silent nonsense score.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import torch
from torch import nn

AESTHETIC_WIDTHS = (1024, 128, 64, 16, 1)
"""LAION improved-aesthetic-predictor: embedding → 1024 → 128 → 64 → 16 → 1."""


class AestheticMLP(nn.Module):
    """LAION's aesthetic predictor (improved-aesthetic-predictor, `sac+logos+ava1-l14-linearMSE`).

    Linear layers with dropout between and no activation, exactly as trained, so that its
    state dict (`layers.0.weight` … `layers.7.bias`) loads as published. Input: the
    L2-normalised CLIP ViT-L/14 image embedding (768). Output: a score around 1–10.
    """

    def __init__(self, dim: int = 768) -> None:
        super().__init__()
        w = AESTHETIC_WIDTHS
        self.layers = nn.Sequential(
            nn.Linear(dim, w[0]),
            nn.Dropout(0.2),
            nn.Linear(w[0], w[1]),
            nn.Dropout(0.2),
            nn.Linear(w[1], w[2]),
            nn.Dropout(0.1),
            nn.Linear(w[2], w[3]),
            nn.Linear(w[3], w[4]),
        )

    def forward(self, emb_BD: torch.Tensor) -> torch.Tensor:
        """Scores (B,) of normalised embeddings (B, D)."""
        return self.layers(emb_BD).squeeze(-1)


class SafetyMLP(nn.Module):
    """A safety head: Linear layers with ReLU between, sigmoid on the one output.

    The layout is read from the state dict (`0.weight`, `2.weight`, … of an `nn.Sequential`),
    so any depth and width trained on the same embedding loads.
    """

    def __init__(self, widths: list[int]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(itertools.pairwise(widths)):
            if i:
                layers.append(nn.ReLU())
            layers.append(nn.Linear(a, b))
        self.net = nn.Sequential(*layers)

    def forward(self, emb_BD: torch.Tensor) -> torch.Tensor:
        """Probabilities (B,) in [0, 1]."""
        return torch.sigmoid(self.net(emb_BD).squeeze(-1))


def _state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a torch state dict, got {type(state).__name__}")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_aesthetic(path: str | Path, dim: int) -> AestheticMLP:
    """The aesthetic MLP from `path`, checked against the embedding width `dim`.

    Raises:
        ValueError: the file is not an aesthetic MLP for embeddings of width `dim`.
    """
    state = _state_dict(path)
    model = AestheticMLP(dim)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise ValueError(
            f"{path} is not a LAION aesthetic MLP for {dim}-wide embeddings ({first}); "
            "models.aesthetic_weights must match models.clip_model"
        ) from e
    return model.eval()


def load_safety(path: str | Path, dim: int) -> SafetyMLP:
    """The safety MLP from `path`; its first layer must take `dim` inputs, its last give 1.

    Raises:
        ValueError: the file is not such a head.
    """
    state = _state_dict(path)
    weights = sorted((int(k.split(".")[0]), v) for k, v in state.items() if k.endswith(".weight"))
    if not weights or any(v.ndim != 2 for _, v in weights):
        raise ValueError(f"{path}: expected Linear layers ('0.weight', '2.weight', ...)")
    widths = [weights[0][1].shape[1], *(v.shape[0] for _, v in weights)]
    if widths[0] != dim or widths[-1] != 1:
        raise ValueError(
            f"{path}: a safety head maps {dim} inputs to 1 output, this one {widths[0]} to "
            f"{widths[-1]}; models.safety_weights must match models.clip_model"
        )
    model = SafetyMLP(widths)
    renamed = {}
    for n, (idx, _) in enumerate(weights):
        for part in ("weight", "bias"):
            renamed[f"net.{2 * n}.{part}"] = state[f"{idx}.{part}"]
    model.load_state_dict(renamed)
    return model.eval()
