"""Federated rounds on the engine: each round trains the sampled clients from the global model
(pipeline.train.engine.train_models, stacked when it can) and combines them
(pipeline.train.combine.combine, with any registered merger as the aggregator), then the server
takes its step.

Everything a round draws follows (seed, round): the clients sampled, and through the caller's
``recipe_for`` and ``generator_for`` each client's mixing and batch order. So a run resumed from
the RoundState a finished round returned continues exactly as an uninterrupted run would
(tested), which lets a stage checkpoint every round.

The server step is FedAvgM's (Hsu, Qi & Brown 2019, "Measuring the Effects of Non-Identical
Data Distribution for Federated Visual Classification"): with the pseudo-gradient
delta = w_global - w_aggregated, v <- momentum * v + delta and w_global <- w_global - lr * v.
lr = 1 and momentum = 0 (the defaults) give plain FedAvg: the aggregate becomes the global model.
Or FedAdam's (Reddi et al. 2021, "Adaptive Federated Optimization", Algorithm 2, as Flower's
FedAdam strategy computes it): with d = w_aggregated - w_global, m <- b1 m + (1 - b1) d,
v <- b2 v + (1 - b2) d^2, w_global <- w_global + lr m / (sqrt(v) + tau), no bias correction.
Buffers (BatchNorm statistics, counters) are taken from the aggregate.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from pipeline.methods.federated import CLIENT_ALGORITHMS
from pipeline.train.combine import combine
from pipeline.train.data_path import BatchSource
from pipeline.train.engine import Recipe, train_models
from pipeline.train.loop import Schedule, steps_per_epoch
from pipeline.train.stacked import StateDict


@dataclass(frozen=True)
class RoundState:
    """What the next round needs. Every random draw of a round follows (seed, round, client),
    so the round number is the whole random state: a run resumed from a saved RoundState
    draws what the uninterrupted run would have drawn."""

    round: int  # rounds finished
    global_state: StateDict
    server_buffer: StateDict = field(default_factory=dict)  # FedAvgM's momentum (empty without it)
    server_state: StateDict = field(default_factory=dict)  # the client algorithm's (SCAFFOLD's c, FedDyn's h)
    client_states: dict[int, StateDict] = field(default_factory=dict)  # per client, kept across rounds


@dataclass(frozen=True)
class Federation:
    """A federation's fixed settings (the per-round randomness comes from ``seed``)."""

    client_algorithm: str = "fedavg"
    client_options: dict | None = None
    aggregator: str = "fedavg"
    aggregator_options: dict | None = None
    sample_fraction: float = 1.0
    server_lr: float = 1.0
    server_momentum: float = 0.0  # FedAvgM's momentum; FedAdam's b1
    seed: int = 0
    server_optimizer: str = "sgd"  # sgd (FedAvg, FedAvgM) | adam (FedAdam)
    server_beta2: float = 0.99  # FedAdam
    server_tau: float = 1e-3  # FedAdam's adaptivity (Reddi et al. tune it over 1e-5 .. 1e-1)


def round_seed(seed: int, round_: int) -> int:
    """One integer seed per (seed, round), for what a round draws outside the clients
    (the client sample, a randomised aggregator's masks)."""
    return int(np.random.SeedSequence([seed, round_]).generate_state(1)[0])


def sample_clients(num_clients: int, fraction: float, seed: int, round_: int) -> list[int]:
    """The round's clients: max(1, int(fraction * K)) of them without replacement, drawn from
    a generator seeded by (seed, round) (the authors' code reseeds per round as well), sorted."""
    m = max(1, int(fraction * num_clients))
    rng = np.random.default_rng(round_seed(seed, round_))
    return sorted(rng.choice(num_clients, m, replace=False).tolist())


def server_step(global_state: StateDict, aggregated: StateDict, buffer: StateDict, lr: float,
                momentum: float, learned: set[str], optimizer: str = "sgd", beta2: float = 0.99,
                tau: float = 1e-3) -> tuple[StateDict, StateDict]:
    """The server optimiser's update on the learned tensors (FedAvgM's SGD with momentum, or
    FedAdam); buffers come from the aggregate. ``buffer`` is the optimiser's state."""
    new_global, new_buffer = {}, {}
    for name, agg in aggregated.items():
        if name not in learned:
            new_global[name] = agg.clone()
            continue
        w = global_state[name].float()
        if optimizer == "adam":
            d = agg.float() - w
            m = (1 - momentum) * d if f"m.{name}" not in buffer else momentum * buffer[f"m.{name}"] + (1 - momentum) * d
            v = (1 - beta2) * d * d if f"v.{name}" not in buffer else beta2 * buffer[f"v.{name}"] + (1 - beta2) * d * d
            new_buffer[f"m.{name}"], new_buffer[f"v.{name}"] = m, v
            new_global[name] = (w + lr * m / (v.sqrt() + tau)).to(agg.dtype)
            continue
        delta = w - agg.float()
        v = delta if name not in buffer else momentum * buffer[name] + delta
        if momentum:
            new_buffer[name] = v
        new_global[name] = (w - lr * v).to(agg.dtype)
    return new_global, new_buffer


def run_round(
    model: nn.Module,
    state: RoundState,
    sources: list[BatchSource],
    sizes: list[int],
    recipe_for: Callable[[int, int], Recipe],
    generator_for: Callable[[int, int], torch.Generator],
    schedule: Schedule,
    federation: Federation,
    device: torch.device,
    *,
    data_for: Callable[[list[int]], object] | None = None,
    stack: bool | None = None,
) -> tuple[RoundState, list[int], list[StateDict]]:
    """One round: sample, train the sampled clients from the global model with the client
    algorithm's terms, update the clients' states, aggregate (weights by client data size, as
    FedAvg), let the algorithm correct the aggregate, take the server step. Returns the new
    state, the sampled clients and their trained states. ``recipe_for(client, round)`` and
    ``generator_for(client, round)`` give each client's recipe and batch-order generator for
    this round; ``data_for(sampled)`` gives a data-aware aggregator its MergeData."""
    round_ = state.round
    algorithm = CLIENT_ALGORITHMS[federation.client_algorithm](**(federation.client_options or {}))
    sampled = sample_clients(len(sources), federation.sample_fraction, federation.seed, round_)
    learned = [n for n, _ in model.named_parameters()]
    global_params = {n: state.global_state[n] for n in learned}
    old_states = [state.client_states.get(i, {}) for i in sampled]
    terms = algorithm.local_terms(global_params, old_states, state.server_state)
    clients, _ = train_models(
        model, [state.global_state] * len(sampled), [sources[i] for i in sampled],
        [recipe_for(i, round_) for i in sampled], schedule, [generator_for(i, round_) for i in sampled], device,
        terms=None if terms.empty else terms, stack=stack,
    )
    new_states = [
        algorithm.client_state_after(old, global_params, trained, schedule.epochs * steps_per_epoch(sizes[i], schedule.batch_size),
                                     schedule.lr, schedule.momentum, state.server_state)
        for i, old, trained in zip(sampled, old_states, clients)
    ]
    weights = torch.tensor([float(sizes[i]) for i in sampled])
    aggregated = combine(federation.aggregator, clients, state.global_state, weights / weights.sum(),
                         federation.aggregator_options, data=None if data_for is None else data_for(sampled),
                         seed=round_seed(federation.seed, round_))
    corrected, server_state = algorithm.server_update(
        {n: aggregated[n] for n in learned}, global_params, clients, old_states, new_states, len(sources),
        state.server_state)
    aggregated = {**aggregated, **corrected}
    new_global, buffer = server_step(state.global_state, aggregated, state.server_buffer, federation.server_lr,
                                     federation.server_momentum, set(learned), federation.server_optimizer,
                                     federation.server_beta2, federation.server_tau)
    client_states = dict(state.client_states)
    client_states.update({i: s for i, s in zip(sampled, new_states) if s})
    return RoundState(round_ + 1, new_global, buffer, server_state, client_states), sampled, clients


def gossip(states: list[StateDict], mixing: torch.Tensor) -> list[StateDict]:
    """One gossip step: node i becomes sum_j W_ij state_j, every floating tensor at once on the
    stacked states (one matmul per tensor); integer buffers (BatchNorm's counters) stay each
    node's own."""
    out = [dict(s) for s in states]
    for name, ref in states[0].items():
        if not ref.is_floating_point():
            continue
        stacked = torch.stack([s[name] for s in states]).flatten(1)
        mixed = (mixing.to(stacked) @ stacked).view(len(states), *ref.shape)
        for i in range(len(states)):
            out[i][name] = mixed[i]
    return out


def run_decentralised_round(
    model: nn.Module,
    nodes: list[StateDict],
    round_: int,
    sources: list[BatchSource],
    recipe_for: Callable[[int, int], Recipe],
    generator_for: Callable[[int, int], torch.Generator],
    schedule: Schedule,
    mixing: torch.Tensor,
    device: torch.device,
    *,
    stack: bool | None = None,
) -> tuple[list[StateDict], list[StateDict]]:
    """Decentralised learning, one round: every node trains from its own state on its own
    shard (stacked), then one gossip step with the round's K x K mixing matrix. Returns the
    trained nodes (before gossip) and the nodes after it."""
    trained, _ = train_models(model, nodes, sources, [recipe_for(i, round_) for i in range(len(nodes))], schedule,
                              [generator_for(i, round_) for i in range(len(nodes))], device, stack=stack)
    return trained, gossip(trained, mixing)
