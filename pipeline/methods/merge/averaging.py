"""Mergers that average: uniform and data-weighted means, Model Stock, SLERP."""
from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field, PositiveInt

from pipeline.methods.merge.base import MERGERS, Fraction, StateDict, is_running_stat, per_tensor, task_vector_merge, weighted_sum


@MERGERS.register("uniform")
def uniform(experts: list[StateDict], base: StateDict | None, weights: torch.Tensor) -> StateDict:
    """Uniform weight averaging (model soup / 'uniform soup', Wortsman et al. 2022)."""
    return weighted_sum(experts, [1.0 / len(experts)] * len(experts))


@MERGERS.register("fedavg")
def fedavg(experts: list[StateDict], base: StateDict | None, weights: torch.Tensor) -> StateDict:
    """FedAvg's aggregation: average weighted by each client's number of samples
    (McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from Decentralized Data")."""
    return weighted_sum(experts, [float(w) for w in weights])

@MERGERS.register("model_stock")
def model_stock(experts: list[StateDict], base: StateDict | None, weights: torch.Tensor) -> StateDict:
    """Model Stock: Jang, Yun & Han 2024, "Model Stock: All we need is just a few fine-tuned
    models". Per tensor, with cos = the mean pairwise cosine between the K task vectors,
    t = K cos / (1 + (K - 1) cos), and the merge is t * mean(experts) + (1 - t) * base."""
    k = len(experts)
    if k < 2:
        raise ValueError("model_stock needs at least 2 experts")

    def combine(_: str, deltas: torch.Tensor) -> torch.Tensor:
        flat = torch.nn.functional.normalize(deltas.reshape(k, -1), dim=1)
        gram = flat @ flat.T
        # Not clamped at 0: with cos < 0, t < 0 and the merge moves away from the mean, as
        # mergekit's model_stock computes it (the paper assumes cos > 0).
        cos = (gram.sum() - gram.diagonal().sum()) / (k * (k - 1))
        t = k * cos / (1 + (k - 1) * cos)
        return t * deltas.mean(0)  # base + t * (mean - base)

    return task_vector_merge(experts, base, combine)


@MERGERS.register("slerp")
def slerp(
    experts: list[StateDict], base: StateDict | None, weights: torch.Tensor, *, t: Fraction = 0.5
) -> StateDict:
    """Spherical linear interpolation of two models, per tensor (Shoemake 1985, as used for
    model merging by mergekit): t = 0 gives the first expert, t = 1 the second. Falls back to
    linear interpolation when the two tensors are (anti)parallel or zero."""
    if len(experts) != 2:
        raise ValueError(f"slerp merges exactly 2 experts, got {len(experts)}")

    def combine(key: str, stacked: torch.Tensor) -> torch.Tensor:
        a, b = stacked[0], stacked[1]
        if is_running_stat(key):
            return (1 - t) * a + t * b
        na, nb = a.norm(), b.norm()
        if na == 0 or nb == 0:
            return (1 - t) * a + t * b
        cos = ((a.flatten() @ b.flatten()) / (na * nb)).clamp(-1.0, 1.0)
        omega = torch.arccos(cos)
        if omega.abs() < 1e-4 or (torch.pi - omega).abs() < 1e-4:
            return (1 - t) * a + t * b
        return (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)

    return per_tensor(experts, combine)


