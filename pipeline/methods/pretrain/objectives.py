"""Pretraining objectives. Each registered builder ``(model, example_batch, temperature)``
returns an nn.Module whose ``forward(model, x, y, g) -> loss`` trains ``model`` (it may own
extra heads, e.g. a projector). Randomness comes from the generator ``g``.

``trains_classifier`` says whether the objective fits the model's classifier; when it
does not (self-supervised), pretrain fits a linear probe on frozen features afterwards.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.methods.pretrain.augment import contrastive_view, random_affine
from pipeline.methods.pretrain.losses import barlow_twins_loss, mixco_term, mixed_barlow_regulariser, nt_xent, supcon
from pipeline.registry import Registry

OBJECTIVES: Registry[Callable[..., nn.Module]] = Registry("pretrain method")


class Supervised(nn.Module):
    """Cross-entropy on labels with light random-affine augmentation."""

    trains_classifier = True

    def forward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        return F.cross_entropy(model(random_affine(x, g)), y)


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


def _projector(dim_in: int, dim_out: int = 64) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim_in, dim_in), nn.ReLU(inplace=True), nn.Linear(dim_in, dim_out))


class SupCon(nn.Module):
    """SupCon: Khosla et al. 2020, "Supervised Contrastive Learning". Two views per image; all
    views with the same label are positives of one another."""

    trains_classifier = False

    def __init__(self, model: nn.Module, temperature: float):
        super().__init__()
        self.temperature, self.projector = temperature, _projector(model.feature_dim)

    def forward(self, model, x, y, g):
        v = torch.cat([contrastive_view(x, g), contrastive_view(x, g)])
        return supcon(self.projector(model.features(v)), torch.cat([y, y]), self.temperature)


class SelfCon(nn.Module):
    """SelfCon: Bae et al. 2023, "Self-Contrastive Learning: Single-viewed Supervised Contrastive
    Framework using Sub-network" (AAAI). One view per image; the sub-network exit (the middle
    of model.mix_layers(), pooled, with its own projector) and the last layer's output are the
    two embeddings, contrasted with SupCon's loss. (The paper's sub-network adds conv blocks
    of its own at the exit; here the exit is pooled features with an MLP projector.)"""

    trains_classifier = False

    def __init__(self, model: nn.Module, temperature: float, example: torch.Tensor):
        super().__init__()
        self.temperature = temperature
        self.exit_index = len(model.mix_layers()) // 2  # an index: holding the module would register it twice
        with torch.no_grad():
            channels = self._exit_features(model, example[:2])[1].shape[1]
        self.sub_projector = _projector(channels)
        self.projector = _projector(model.feature_dim)

    def _exit_features(self, model, x):
        captured = []
        handle = model.mix_layers()[self.exit_index].register_forward_hook(lambda _, __, out: captured.append(out))
        try:
            h = model.features(x)
        finally:
            handle.remove()
        return h, captured[0].mean(dim=(2, 3))

    def forward(self, model, x, y, g):
        h, mid = self._exit_features(model, contrastive_view(x, g))
        z = torch.cat([self.sub_projector(mid), self.projector(h)])
        return supcon(z, torch.cat([y, y]), self.temperature)


class MixCo(SimCLR):
    """MixCo: Kim et al. 2020, "MixCo: Mix-up Contrastive Learning for Visual Representation".
    SimCLR plus a mixed-sample term, as the authors' SimCLR code has it: in each view the
    first half of the batch is mixed with the second half, one lam ~ U(0, 1) per image; each
    view's mixes are contrasted with the other view's clean embeddings (soft targets lam and
    1 - lam on the two sources), and the two views' terms are averaged (weight 1, the same
    temperature). With an odd batch the last image takes no part in the mixes. The mixes go
    through the network in one forward of their own (the authors' code: one per view)."""

    def forward(self, model, x, y, g):
        v1, v2 = contrastive_view(x, g), contrastive_view(x, g)
        half = len(x) // 2
        lam1, lam2 = torch.rand(2, half, 1, 1, 1, generator=g, device=x.device)
        m1 = lam1 * v1[:half] + (1 - lam1) * v1[half:2 * half]
        m2 = lam2 * v2[:half] + (1 - lam2) * v2[half:2 * half]
        z1, z2 = self.projector(model.features(torch.cat([v1, v2]))).chunk(2)
        zm1, zm2 = self.projector(model.features(torch.cat([m1, m2]))).chunk(2)
        mixed = (mixco_term(zm1, z2[:2 * half], lam1, self.temperature)
                 + mixco_term(zm2, z1[:2 * half], lam2, self.temperature)) / 2
        return nt_xent(z1, z2, self.temperature) + mixed


class BarlowTwins(nn.Module):
    """Barlow Twins: Zbontar, Jing, Misra, LeCun & Deny 2021, "Barlow Twins: Self-Supervised
    Learning via Redundancy Reduction". The cross-correlation of two views' embeddings is
    pushed to the identity; off-diagonal weight 5e-3 as in the paper."""

    trains_classifier = False
    off_diagonal = 5e-3

    def __init__(self, model: nn.Module, projection_dim: int = 128):
        super().__init__()
        d = model.feature_dim
        self.projector = nn.Sequential(nn.Linear(d, d, bias=False), nn.BatchNorm1d(d), nn.ReLU(inplace=True),
                                       nn.Linear(d, projection_dim))

    def embed(self, model, views):
        return self.projector(model.features(torch.cat(views))).chunk(len(views))

    def forward(self, model, x, y, g):
        z1, z2 = self.embed(model, [contrastive_view(x, g), contrastive_view(x, g)])
        return barlow_twins_loss(z1, z2, self.off_diagonal)


class MixedBarlowTwins(BarlowTwins):
    """Mixed Barlow Twins: Bandara et al. 2023, "Guarding Barlow Twins Against Overfitting with
    Mixed Samples". A mix m = lam * v1 + (1 - lam) * v2 shuffled (lam ~ U(0, 1)); by linearity
    its cross-correlation with each view should be the same mix of the views' correlations:
    C(m, a) ~ lam C(a, a) + (1 - lam) C(b_shuffled, a), and likewise against b. The squared
    deviations, weighted like the off-diagonal terms, are added to the Barlow Twins loss."""

    def forward(self, model, x, y, g):
        v1, v2 = contrastive_view(x, g), contrastive_view(x, g)
        lam = torch.rand((), generator=g, device=x.device)
        perm = torch.randperm(len(x), generator=g, device=x.device)
        za, zb, zm = self.embed(model, [v1, v2, lam * v1 + (1 - lam) * v2[perm]])
        return barlow_twins_loss(za, zb, self.off_diagonal) + self.off_diagonal * mixed_barlow_regulariser(
            za, zb, zm, lam, perm)


@OBJECTIVES.register("supervised")
def supervised(model: nn.Module, example: torch.Tensor, temperature: float) -> nn.Module:
    return Supervised()


@OBJECTIVES.register("simclr")
def simclr(model: nn.Module, example: torch.Tensor, temperature: float) -> nn.Module:
    return SimCLR(model.feature_dim, temperature)


@OBJECTIVES.register("supcon")
def supcon_objective(model: nn.Module, example: torch.Tensor, temperature: float) -> nn.Module:
    return SupCon(model, temperature)


@OBJECTIVES.register("selfcon")
def selfcon(model: nn.Module, example: torch.Tensor, temperature: float) -> nn.Module:
    return SelfCon(model, temperature, example)


@OBJECTIVES.register("mixco")
def mixco(model: nn.Module, example: torch.Tensor, temperature: float) -> nn.Module:
    return MixCo(model.feature_dim, temperature)


@OBJECTIVES.register("barlow_twins")
def barlow_twins(model: nn.Module, example: torch.Tensor, temperature: float) -> nn.Module:
    return BarlowTwins(model)


@OBJECTIVES.register("mixed_barlow_twins")
def mixed_barlow_twins(model: nn.Module, example: torch.Tensor, temperature: float) -> nn.Module:
    return MixedBarlowTwins(model)
