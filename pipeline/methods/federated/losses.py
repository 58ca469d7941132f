"""Output-space terms of client algorithms: pure functions of a batch's logits."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def not_true_logits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(N, C) logits without each row's true class: (N, C - 1), the other classes in order."""
    n, c = logits.shape
    keep = torch.ones(n, c, dtype=torch.bool, device=logits.device)
    keep[torch.arange(n, device=logits.device), targets] = False
    return logits[keep].view(n, c - 1)


def not_true_distillation(logits: torch.Tensor, global_logits: torch.Tensor, targets: torch.Tensor,
                          tau: float = 1.0) -> torch.Tensor:
    """FedNTD's distillation term: Lee et al. 2022, "Preservation of the Global Knowledge by
    Not-True Distillation in Federated Learning" (NeurIPS). KL(q_global || q_local) between the
    softmax at temperature tau of the not-true classes' logits (the true class removed from
    both), batch mean, no tau^2 factor, as the authors' NTD_Loss computes it; the global
    model's side carries no gradient. The client loss is CE + beta * this (the authors'
    benchmark config: tau = 1, beta = 1)."""
    local = F.log_softmax(not_true_logits(logits, targets) / tau, dim=1)
    with torch.no_grad():
        target = F.softmax(not_true_logits(global_logits, targets) / tau, dim=1)
    return F.kl_div(local, target, reduction="batchmean")


def not_true_distillation_stacked(logits: torch.Tensor, global_logits: torch.Tensor, soft_targets: torch.Tensor,
                                  tau: float = 1.0) -> torch.Tensor:
    """not_true_distillation for (m, B, C) logits of m clients at once -> (m,), with soft
    (mixed) targets: the classes a sample's target gives any mass are its true classes (one
    for a clean label, two for a MixUp or CutMix pair), dropped from both softmaxes by
    masking. For one-hot targets this is exactly not_true_distillation (tested)."""
    true = soft_targets > 0
    masked = lambda z: (z / tau).masked_fill(true, float("-inf"))  # noqa: E731
    local = masked(logits).log_softmax(-1)
    with torch.no_grad():
        target = masked(global_logits).softmax(-1)
    terms = torch.where(true, torch.zeros_like(local), target * (target.clamp_min(1e-30).log() - local))
    return terms.sum(-1).mean(-1)
