"""Client algorithms of federated learning, as terms of a client's local objective.

A client algorithm: ``(global_params, **options) -> Penalty | None``, where ``global_params``
are the parameters the round's clients start from and a Penalty
(pipeline.train.stacked.Penalty) maps the parameters of some clients, stacked on a leading
axis, to one loss term per client. The engine adds it to each client's loss on either path
(stacked or one by one), so a client algorithm never loops over clients. Options are
keyword-only and annotated, as for every registry.

Algorithms that look at model outputs (FedNTD, MOON, FedSoL) or keep per-client state across
rounds (SCAFFOLD, FedDyn) need more than a parameter penalty; they are not here yet.
"""
from __future__ import annotations

from typing import Annotated, Callable

import torch
from pydantic import Field

from pipeline.registry import Registry

StateDict = dict[str, torch.Tensor]
Penalty = Callable[[dict[str, torch.Tensor], list[int]], torch.Tensor]
CLIENT_ALGORITHMS: Registry[Callable[..., Penalty | None]] = Registry("client algorithm")


@CLIENT_ALGORITHMS.register("fedavg")
def fedavg(global_params: StateDict) -> Penalty | None:
    """FedAvg's client: plain local training from the global model (McMahan et al. 2017,
    "Communication-Efficient Learning of Deep Networks from Decentralized Data")."""
    return None


@CLIENT_ALGORITHMS.register("fedprox")
def fedprox(global_params: StateDict, *, mu: Annotated[float, Field(ge=0)] = 0.01) -> Penalty:
    """FedProx: Li et al. 2020, "Federated Optimization in Heterogeneous Networks". The local
    objective adds mu/2 * ||w - w_global||^2 over every trainable parameter (as the FedNTD
    authors' FedProx client computes it: the squared differences of all named parameters,
    summed). The paper tunes mu over {0.001, 0.01, 0.1, 1}; the FedNTD authors' benchmark
    config uses mu = 1.0."""

    def penalty(params: dict[str, torch.Tensor], members: list[int]) -> torch.Tensor:
        total = None
        for name, p in params.items():
            term = (p - global_params[name].unsqueeze(0)).pow(2).flatten(1).sum(1)
            total = term if total is None else total + term
        return 0.5 * mu * total

    return penalty
