"""Training losses for mixed batches: ``(logits, targets, smoothing, **options) -> scalar``.

``targets`` is (N, 2, C): row 0 the mixed soft targets, row 1 the clean one-hot labels.
``logits`` is (N, C) for the mixed batch, or (2N, C) (mixed, then clean) for a loss marked
``needs_clean`` that also looks at the unmixed images. ``smoothing`` is label smoothing's
epsilon (Szegedy et al. 2016): targets become (1 - eps) * t + eps / C. All losses are
vmappable (no data-dependent control flow), so stacked training can use them.
Options are keyword-only and typed; config validation reads them from the signature.
"""
from __future__ import annotations

from typing import Annotated, Callable

import torch
from pydantic import Field

from pipeline.registry import Registry

MIX_LOSSES: Registry[Callable[..., torch.Tensor]] = Registry("mix loss")


def smooth(targets: torch.Tensor, eps: float) -> torch.Tensor:
    return targets * (1 - eps) + eps / targets.shape[-1]


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against soft (mixed) targets, averaged over the batch."""
    return -(target * logits.float().log_softmax(-1)).sum(-1).mean()


@MIX_LOSSES.register("soft_ce")
def soft_ce(logits: torch.Tensor, targets: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Cross-entropy against the mixed soft targets (mixup's own loss)."""
    return soft_cross_entropy(logits, smooth(targets[:, 0], smoothing))


def decoupled_log_probs(logits: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """For each class c, log softmax over {c} and the non-mixed classes only: the other mixed
    class is left out of the normaliser (the 'decoupled' softmax)."""
    z = logits.float()
    others = torch.logsumexp(z.masked_fill(positive, float("-inf")), dim=-1, keepdim=True)
    return z - torch.logaddexp(z, others)


@MIX_LOSSES.register("decoupled")
def decoupled(logits: torch.Tensor, targets: torch.Tensor, smoothing: float, *,
              eta: Annotated[float, Field(ge=0)] = 0.1) -> torch.Tensor:
    """Decoupled mixup: Liu et al. 2023, "Harnessing Hard Mixed Samples with Decoupled
    Regularizer" (NeurIPS), as openmixup's soft_mix_cross_entropy computes it. A sample mixed
    from two classes gets mixup's cross-entropy plus eta times the DM regulariser
    -sum over its mixed classes c of log softmax_c, each class's softmax leaving the other
    mixed class out (so a class that contributes little of the image must still be predicted
    with confidence). A sample whose pair shares its class (one-hot target) gets the plain
    cross-entropy only. Each group is averaged over its own samples and the two means are
    added, as openmixup does. A class counts as mixed above a 1e-3 share (openmixup's eps).
    One eta for both classes (the paper's form; openmixup's configs can weight them apart)."""
    mixed = targets[:, 0]
    positive = mixed > 1e-3
    two = (positive.sum(-1) >= 2).to(logits.dtype)
    ce = -(smooth(mixed, smoothing) * logits.float().log_softmax(-1)).sum(-1)
    dm = -(positive * decoupled_log_probs(logits, positive)).sum(-1)
    mixed_mean = ((ce + eta * dm) * two).sum() / two.sum().clamp(min=1)
    one_hot_mean = (ce * (1 - two)).sum() / (1 - two).sum().clamp(min=1)
    return mixed_mean + one_hot_mean


@MIX_LOSSES.register("rankmixup")
def rankmixup(logits: torch.Tensor, targets: torch.Tensor, smoothing: float, *,
              margin: Annotated[float, Field(ge=0)] = 0.1,
              weight: Annotated[float, Field(ge=0)] = 1.0) -> torch.Tensor:
    """RankMixup's mixup ranking loss (MRL): Noh et al. 2023, "RankMixup: Ranking-Based Mixup
    Training for Network Calibration" (ICCV). Cross-entropy on the clean images plus
    weight * mean(max(0, conf(mixed) - conf(clean) + margin)), conf = the top softmax
    probability: a mixed image must be predicted less confidently than its clean source.
    (The paper's second variant, M-NDCG, is not included.)"""
    n = targets.shape[0]
    mixed, clean = logits[:n].float(), logits[n:].float()
    conf_mixed = mixed.softmax(-1).amax(-1)
    conf_clean = clean.softmax(-1).amax(-1)
    ranking = torch.relu(conf_mixed - conf_clean + margin).mean()
    return soft_cross_entropy(clean, smooth(targets[:, 1], smoothing)) + weight * ranking


rankmixup.needs_clean = True
