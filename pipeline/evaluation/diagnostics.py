"""Mergeability of a pair of experts: how far apart they sit and whether the straight line
between them stays in a low-loss region.

- interpolation barrier: along theta(a) = (1 - a) theta_1 + a theta_2, the largest rise of
  test loss above the straight line between the endpoints' losses (Frankle et al. 2020,
  "Linear Mode Connectivity and the Lottery Ticket Hypothesis"; Entezari et al. 2022), and
  the same for accuracy (largest drop below the line). BatchNorm statistics are recomputed
  at every point, as merge does, so the barrier is the one a merge would meet.
- task-vector cosine: cosine of (theta_1 - theta_0) and (theta_2 - theta_0) over all learned
  weights (Ilharco et al. 2023 use it to show task vectors are near orthogonal).
- sign conflicts: the share of learned weights where both task vectors move and in opposite
  directions (the interference TIES resolves, Yadav et al. 2023).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.nn.batchnorm import recalibrate
from pipeline.nn.inference import predict_logits

StateDict = dict[str, torch.Tensor]


def _learned(state: StateDict) -> list[str]:
    return [k for k, v in state.items()
            if v.is_floating_point() and not k.endswith(("running_mean", "running_var"))]


def task_vector(state: StateDict, base: StateDict) -> torch.Tensor:
    return torch.cat([(state[k].float() - base[k].float()).flatten() for k in _learned(state)])


def task_vector_cosine(a: StateDict, b: StateDict, base: StateDict) -> float:
    return float(F.cosine_similarity(task_vector(a, base), task_vector(b, base), dim=0))


def sign_conflict_share(a: StateDict, b: StateDict, base: StateDict) -> float:
    da, db = task_vector(a, base), task_vector(b, base)
    return float(((da * db) < 0).float().mean())


def interpolate(a: StateDict, b: StateDict, t: float) -> StateDict:
    return {k: ((1 - t) * v.float() + t * b[k].float()).to(v.dtype) if v.is_floating_point() else v.clone()
            for k, v in a.items()}


@torch.no_grad()
def interpolation_curve(model: nn.Module, a: StateDict, b: StateDict, points: int, x: torch.Tensor,
                        y: torch.Tensor, x_recalibrate: torch.Tensor | None, bn_batch_size: int = 256) -> list[dict]:
    """Test loss and accuracy at ``points`` evenly spaced points from a (t=0) to b (t=1)."""
    rows = []
    for i in range(points):
        t = i / (points - 1)
        model.load_state_dict(interpolate(a, b, t))
        if x_recalibrate is not None:
            recalibrate(model, x_recalibrate, bn_batch_size)
        logits = predict_logits(model, x)
        rows.append({"t": t, "loss": float(F.cross_entropy(logits, y)),
                     "accuracy": float((logits.argmax(1) == y).float().mean())})
    return rows


def barriers(curve: list[dict]) -> dict[str, float]:
    """Largest loss rise above, and accuracy drop below, the line between the endpoints."""
    first, last = curve[0], curve[-1]
    line = lambda key, t: (1 - t) * first[key] + t * last[key]  # noqa: E731
    return {"loss_barrier": max(r["loss"] - line("loss", r["t"]) for r in curve),
            "accuracy_barrier": max(line("accuracy", r["t"]) - r["accuracy"] for r in curve)}
