"""Pretraining losses: pure functions of embeddings (solo-learn keeps its losses apart from
its methods the same way). The objectives in objectives.py build views and call these."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent (normalised temperature-scaled cross-entropy) over 2N views; the positive of
    view i is its other view, the other 2N-2 views are negatives (Chen et al. 2020)."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = z1.shape[0]
    sim = z @ z.T / temperature
    sim.fill_diagonal_(float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, targets)


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


def mixco_term(z_mixed: torch.Tensor, z_clean: torch.Tensor, lam: torch.Tensor, temperature: float) -> torch.Tensor:
    """MixCo's mixed-sample loss, as the authors' SimCLR code computes it: the batch's first half
    is mixed with its second half, mix i = lam_i * x_i + (1 - lam_i) * x_(i + N/2), one lam per
    image. Each mix's embedding (N/2 rows) is scored against all N clean embeddings of the other
    view, with soft targets lam_i on column i and 1 - lam_i on column i + N/2; soft
    cross-entropy, averaged over the mixes."""
    half = len(z_mixed)
    logits = F.normalize(z_mixed, dim=1) @ F.normalize(z_clean, dim=1).T / temperature  # (N/2, N)
    eye = torch.eye(half, device=z_mixed.device)
    lam = lam.reshape(-1, 1)
    target = torch.cat([lam * eye, (1 - lam) * eye], dim=1)
    return -(target * logits.log_softmax(1)).sum(1).mean()


def batch_standardise(z: torch.Tensor) -> torch.Tensor:
    return (z - z.mean(0)) / z.std(0, unbiased=False).clamp(min=1e-6)


def barlow_twins_loss(z1: torch.Tensor, z2: torch.Tensor, off_diagonal: float) -> torch.Tensor:
    """Zbontar et al. 2021: C = z1n^T z2n / N on batch-standardised embeddings;
    sum_i (1 - C_ii)^2 + off_diagonal * sum_{i != j} C_ij^2."""
    c = batch_standardise(z1).T @ batch_standardise(z2) / len(z1)
    on = (1 - c.diagonal()).pow(2).sum()
    off = c.pow(2).sum() - c.diagonal().pow(2).sum()
    return on + off_diagonal * off


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
