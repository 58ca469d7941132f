"""One expert's fine-tuning recipe: which mixer(s), with what probabilities, and which loss.

``batch(x, y) -> (inputs, targets)`` runs outside any vmap (it draws randomness, from the
recipe's own numpy Generator: one recipe per model, so each model has its own stream);
``loss(logits, targets)`` is vmappable. Both training paths (training.fit one expert at a
time, stacked.fit_stacked K at once) use the same recipe, so they train the same thing.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.methods.mix.losses import MIX_LOSSES
from pipeline.methods.mix.mixers import build_mixer


class MixRecipe:
    def __init__(self, mixers: dict[str, float], alpha: float, num_classes: int, loss: str,
                 loss_options: dict | None = None, smoothing: float = 0.0, seed: int = 0):
        self.names = list(mixers)
        self.mixers = [build_mixer(n) for n in self.names]
        total = sum(mixers.values())
        self.probs = np.array([p / total for p in mixers.values()])
        self.rng = np.random.default_rng(seed)
        self.alpha, self.num_classes, self.smoothing = alpha, num_classes, smoothing
        self.loss_fn = MIX_LOSSES[loss]
        self.loss_options = loss_options or {}
        self.needs_clean = getattr(self.loss_fn, "needs_clean", False)

    @property
    def loss_key(self) -> tuple:
        """What decides the loss function: recipes with equal keys can share one vmapped loss."""
        return (self.loss_fn, self.smoothing, tuple(sorted(self.loss_options.items())))

    @property
    def mixes_hidden_layers(self) -> bool:
        """True when a mixer hooks the model (manifold mixup): such a recipe cannot be vmapped."""
        return any(hasattr(m, "attach") for m in self.mixers)

    def attach(self, model: nn.Module) -> list:
        return [h for m in self.mixers if hasattr(m, "attach") for h in m.attach(model)]

    def batch(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixed inputs (with the clean ones appended when the loss needs them) and (N, 2, C)
        targets: mixed soft targets and clean one-hot labels."""
        if len(self.mixers) == 1:
            mixer = self.mixers[0]
        else:  # one mixer per batch, drawn with the configured probabilities
            mixer = self.mixers[int(self.rng.choice(len(self.mixers), p=self.probs))]
        xm, ym = mixer(x, y, self.num_classes, self.alpha, self.rng)
        clean = F.one_hot(y, self.num_classes).to(ym.dtype)
        inputs = torch.cat([xm, x]) if self.needs_clean else xm
        return inputs, torch.stack([ym, clean], 1)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(logits, targets, self.smoothing, **self.loss_options)
