"""What a round of federated or decentralised training is measured by, beside the global
model's accuracy: how far apart the round's clients went (client drift) and how much the
aggregate loses against the clients' own ensemble."""
from __future__ import annotations

import torch
from torch import nn

from pipeline.evaluation.metrics import accuracy, nll
from pipeline.nn.inference import predict_logits

StateDict = dict[str, torch.Tensor]


def task_vectors(start: StateDict, clients: list[StateDict], names: list[str]) -> torch.Tensor:
    """(m, P): each client's learned parameters minus the ones it started from, flattened."""
    return torch.stack([torch.cat([(c[n].float() - start[n].float()).flatten() for n in names]) for c in clients])


def client_drift(start: StateDict, clients: list[StateDict], names: list[str]) -> dict[str, float]:
    """mean_cosine: the mean cosine similarity of the clients' task vectors over all pairs
    (1: they moved the same way; 0 or below: they pulled apart; nan with one client).
    sign_conflict: the share of coordinates that some clients moved up and others down (the
    conflicts TIES-merging resolves)."""
    tv = task_vectors(start, clients, names)
    m = len(tv)
    if m < 2:
        return {"mean_cosine": float("nan"), "sign_conflict": 0.0}
    unit = tv / tv.norm(dim=1, keepdim=True).clamp_min(1e-12)
    gram = unit @ unit.T
    mean_cosine = (gram.sum() - gram.diagonal().sum()) / (m * (m - 1))
    conflict = ((tv > 0).any(0) & (tv < 0).any(0)).float().mean()
    return {"mean_cosine": float(mean_cosine), "sign_conflict": float(conflict)}


def round_scores(model: nn.Module, global_state: StateDict, clients: list[StateDict], x_val: torch.Tensor,
                 y_val: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor, batch_size: int = 512) -> dict[str, float]:
    """The global model's test and validation accuracy and loss, and ensemble_gap: the
    validation accuracy of the clients' logit ensemble minus the global model's (what the
    aggregation lost against keeping every client)."""
    model.load_state_dict(global_state)
    val, test = predict_logits(model, x_val, batch_size), predict_logits(model, x_test, batch_size)
    scores = {"test_accuracy": accuracy(test, y_test), "test_loss": nll(test, y_test),
              "val_accuracy": accuracy(val, y_val), "val_loss": nll(val, y_val)}
    if clients:
        ensemble = 0
        for state in clients:
            model.load_state_dict(state)
            ensemble = ensemble + predict_logits(model, x_val, batch_size)
        scores["ensemble_gap"] = accuracy(ensemble / len(clients), y_val) - scores["val_accuracy"]
    model.load_state_dict(global_state)
    return scores
