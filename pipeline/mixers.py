"""Mixing policies for fine-tuning: ``(x, y, num_classes, alpha) -> (x_mixed, y_soft)``.

MixUp and CutMix are torchvision.transforms.v2's own implementations. They draw from
torch's global RNG (they take no generator), so stages seed it with ``torch.manual_seed``.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from pipeline.registry import Registry

Mixer = Callable[[torch.Tensor, torch.Tensor, int, float], tuple[torch.Tensor, torch.Tensor]]
MIXERS: Registry[Mixer] = Registry("mixer")


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against soft (mixed) targets, averaged over the batch."""
    return -(target * logits.float().log_softmax(-1)).sum(-1).mean()


@MIXERS.register("none")
def no_mixing(x: torch.Tensor, y: torch.Tensor, num_classes: int, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain empirical risk minimisation: inputs unchanged, one-hot targets."""
    return x, F.one_hot(y, num_classes).to(x.dtype)


@MIXERS.register("mixup")
def mixup(x: torch.Tensor, y: torch.Tensor, num_classes: int, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup: Zhang, Cisse, Dauphin & Lopez-Paz 2018, "mixup: Beyond Empirical Risk
    Minimization". Convex combination of a batch with its roll, lambda ~ Beta(alpha, alpha)."""
    return v2.MixUp(alpha=alpha, num_classes=num_classes)(x, y)


@MIXERS.register("cutmix")
def cutmix(x: torch.Tensor, y: torch.Tensor, num_classes: int, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """CutMix: Yun et al. 2019, "CutMix: Regularization Strategy to Train Strong Classifiers
    with Localizable Features". Pastes a box from the rolled batch; targets mix by box area."""
    return v2.CutMix(alpha=alpha, num_classes=num_classes)(x, y)
