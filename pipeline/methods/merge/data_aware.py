"""Mergers that look at data: Fisher-weighted averaging, RegMean, greedy soup."""
from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field, PositiveInt

from pipeline.methods.merge.averaging import uniform
from pipeline.methods.merge.base import MERGERS, Fraction, StateDict, needs_data, per_tensor


@MERGERS.register("fisher")
def fisher(
    experts: list[StateDict], base: StateDict | None, weights: torch.Tensor, data=None, *,
    samples: PositiveInt = 256, floor: Annotated[float, Field(gt=0)] = 1e-8,
) -> StateDict:
    """Fisher-weighted averaging: Matena & Raffel 2022, "Merging Models with Fisher-Weighted
    Averaging". theta = sum_k (F_k + floor) theta_k / sum_k (F_k + floor), F_k the diagonal
    Fisher of expert k on up to ``samples`` images of its own shard; where no expert has
    Fisher mass the floor makes it the plain average. Buffers are averaged."""
    data = needs_data(data, "fisher")
    fishers = [data.fisher(k, e, samples) for k, e in enumerate(experts)]

    def combine(key: str, stacked: torch.Tensor) -> torch.Tensor:
        if key not in fishers[0]:
            return stacked.mean(0)
        f = torch.stack([fk[key].float() for fk in fishers]) + floor
        return (f * stacked).sum(0) / f.sum(0)

    return per_tensor(experts, combine)


@MERGERS.register("regmean")
def regmean(
    experts: list[StateDict], base: StateDict | None, weights: torch.Tensor, data=None, *,
    alpha: Fraction = 0.9,
) -> StateDict:
    """RegMean: Jin et al. 2023, "Dataless Knowledge Fusion by Merging Weights of Language
    Models". Each linear (and conv, on unfolded patches) weight solves the regression that
    matches every expert's outputs on its own inputs: W = (sum_k G_k)^-1 sum_k G_k W_k^T with
    G_k = X_k^T X_k, off-diagonals scaled by ``alpha``. Other tensors (biases, BatchNorm) are
    averaged. A ridge of 1e-6 x the mean diagonal, pulling towards the plain average, keeps
    the solve defined when an input dimension is always zero (e.g. a dead ReLU channel):
    W = (G + rI)^-1 (sum_k G_k W_k^T + r W_avg^T)."""
    from pipeline.methods.merge.data import weight_layers

    data = needs_data(data, "regmean")
    grams = [data.grams(k, e) for k, e in enumerate(experts)]
    solved = {f"{n}.weight": n for n in weight_layers(data.model)}

    def combine(key: str, stacked: torch.Tensor) -> torch.Tensor:
        if key not in solved:
            return stacked.mean(0)
        k, out = stacked.shape[0], stacked.shape[1]
        w = stacked.reshape(k, out, -1)  # (K, out, D)
        w = w.double()  # the normal equations are ill-conditioned in float32
        g = torch.stack([gk[solved[key]].double() for gk in grams])  # (K, D, D)
        diag = torch.diag_embed(g.diagonal(dim1=1, dim2=2))
        g = alpha * g + (1 - alpha) * diag
        total = g.sum(0)
        ridge = 1e-6 * total.diagonal().mean().clamp(min=1e-12)
        total = total + ridge * torch.eye(total.shape[0], device=total.device, dtype=total.dtype)
        rhs = (g @ w.transpose(1, 2)).sum(0) + ridge * w.mean(0).T  # (D, out)
        return torch.linalg.solve(total, rhs).T.reshape(stacked.shape[1:]).to(stacked.dtype)

    return per_tensor(experts, combine)


@MERGERS.register("greedy_soup")
def greedy_soup(experts: list[StateDict], base: StateDict | None, weights: torch.Tensor, data=None) -> StateDict:
    """Greedy soup: Wortsman et al. 2022, "Model soups: averaging weights of multiple
    fine-tuned models improves accuracy without increasing inference time". Experts sorted by
    validation accuracy; each is added to the uniform soup only if the soup's validation
    accuracy does not drop. The chosen experts are left in ``data.notes['greedy_soup']``."""
    data = needs_data(data, "greedy_soup")
    scores = [data.val_accuracy(e) for e in experts]
    order = sorted(range(len(experts)), key=lambda i: -scores[i])
    chosen, best = [order[0]], scores[order[0]]
    for i in order[1:]:
        acc = data.val_accuracy(uniform([experts[j] for j in chosen + [i]], base, weights))
        if acc >= best:
            chosen, best = chosen + [i], acc
    data.notes["greedy_soup"] = {"experts": sorted(chosen), "val_accuracy": best}
    return uniform([experts[j] for j in chosen], base, weights)


