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


def supcon(z: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Supervised contrastive loss (L_out of Khosla et al. 2020): for each anchor i, the mean
    over its positives p (same label, p != i) of -log(exp(s_ip / t) / sum_{a != i} exp(s_ia / t)),
    averaged over anchors that have a positive."""
    z = F.normalize(z, dim=1)
    sim = z @ z.T / temperature
    self_mask = torch.eye(len(z), dtype=torch.bool, device=z.device)
    log_prob = sim.masked_fill(self_mask, float("-inf")).log_softmax(1)
    positive = (labels[:, None] == labels[None, :]) & ~self_mask
    count = positive.sum(1)
    per_anchor = -(log_prob.masked_fill(~positive, 0.0)).sum(1) / count.clamp(min=1)
    has = count > 0
    return (per_anchor * has).sum() / has.sum().clamp(min=1)


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


def mixco_term(z_mixed: torch.Tensor, z_clean: torch.Tensor, lam: torch.Tensor, temperature: float) -> torch.Tensor:
    """MixCo's mixed-sample loss: mix i (of images i and i - 1) against the clean embeddings,
    cross-entropy with soft target lam on i and 1 - lam on i - 1."""
    logits = F.normalize(z_mixed, dim=1) @ F.normalize(z_clean, dim=1).T / temperature
    eye = torch.eye(len(z_mixed), device=z_mixed.device)
    target = lam * eye + (1 - lam) * eye.roll(1, 0)  # row i: lam at i, 1 - lam at i - 1
    return -(target * logits.log_softmax(1)).sum(1).mean()


class MixCo(SimCLR):
    """MixCo: Kim et al. 2020, "MixCo: Mix-up Contrastive Learning for Visual Representation".
    SimCLR plus a mixed-sample term: a mix lam * v1_i + (1 - lam) * v1_(i-1), lam ~ U(0, 1),
    is contrasted against the clean second views with soft targets lam on view i and
    1 - lam on view i - 1 (weight 1, same temperature)."""

    def forward(self, model, x, y, g):
        v1, v2 = contrastive_view(x, g), contrastive_view(x, g)
        lam = torch.rand((), generator=g, device=x.device)
        mixed = lam * v1 + (1 - lam) * v1.roll(1, 0)
        z1, z2, zm = self.projector(model.features(torch.cat([v1, v2, mixed]))).chunk(3)
        return nt_xent(z1, z2, self.temperature) + mixco_term(zm, z2, lam, self.temperature)


def batch_standardise(z: torch.Tensor) -> torch.Tensor:
    return (z - z.mean(0)) / z.std(0, unbiased=False).clamp(min=1e-6)


def barlow_twins_loss(z1: torch.Tensor, z2: torch.Tensor, off_diagonal: float) -> torch.Tensor:
    """Zbontar et al. 2021: C = z1n^T z2n / N on batch-standardised embeddings;
    sum_i (1 - C_ii)^2 + off_diagonal * sum_{i != j} C_ij^2."""
    c = batch_standardise(z1).T @ batch_standardise(z2) / len(z1)
    on = (1 - c.diagonal()).pow(2).sum()
    off = c.pow(2).sum() - c.diagonal().pow(2).sum()
    return on + off_diagonal * off


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


def mixed_barlow_regulariser(za: torch.Tensor, zb: torch.Tensor, zm: torch.Tensor, lam: torch.Tensor,
                             perm: torch.Tensor) -> torch.Tensor:
    """sum over t in (a, b) of ||C(m, t) - (lam C(a, t) + (1 - lam) C(b_perm, t))||^2, with
    C(u, v) = u^T v / N on batch-standardised embeddings."""
    a, b, m = batch_standardise(za), batch_standardise(zb), batch_standardise(zm)
    n = len(za)
    reg = torch.zeros((), device=za.device)
    for target in (a, b):
        expected = (lam * a + (1 - lam) * b[perm]).T @ target / n
        reg = reg + (m.T @ target / n - expected).pow(2).sum()
    return reg


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
