"""Pretraining objectives. Each registered builder returns an nn.Module whose
``forward(model, x, y, g) -> loss`` trains ``model`` (it may own extra heads, e.g. a projector).

``trains_classifier`` says whether the objective fits the model's classifier; when it
does not (self-supervised), pretrain fits a linear probe on frozen features afterwards.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.augment import contrastive_view, random_affine
from pipeline.registry import Registry

OBJECTIVES: Registry[Callable[..., nn.Module]] = Registry("pretrain method")


class Supervised(nn.Module):
    """Cross-entropy on labels with light random-affine augmentation."""

    trains_classifier = True

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        return F.cross_entropy(model(random_affine(x, g)), y)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent (normalised temperature-scaled cross-entropy) over 2N views; the positive of
    view i is its other view, the other 2N-2 views are negatives (Chen et al. 2020)."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = z1.shape[0]
    sim = z @ z.T / temperature
    sim.fill_diagonal_(float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, targets)


class SimCLR(nn.Module):
    """SimCLR: Chen, Kornblith, Norouzi & Hinton 2020, "A Simple Framework for Contrastive
    Learning of Visual Representations". Two augmented views, a 2-layer MLP projector, NT-Xent."""

    trains_classifier = False

    def __init__(self, feature_dim: int, temperature: float = 0.5, projection_dim: int = 64):
        super().__init__()
        self.temperature = temperature
        self.projector = nn.Sequential(
            nn.Linear(feature_dim, feature_dim), nn.ReLU(inplace=True), nn.Linear(feature_dim, projection_dim)
        )

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        v1, v2 = contrastive_view(x, g), contrastive_view(x, g)
        h = model.features(torch.cat([v1, v2]))
        z1, z2 = self.projector(h).chunk(2)
        return nt_xent(z1, z2, self.temperature)


@OBJECTIVES.register("supervised")
def supervised(feature_dim: int, temperature: float) -> nn.Module:
    return Supervised()


@OBJECTIVES.register("simclr")
def simclr(feature_dim: int, temperature: float) -> nn.Module:
    return SimCLR(feature_dim, temperature)
