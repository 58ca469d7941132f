"""Decentralised learning's communication graphs, as K x K mixing matrices W: after a gossip
step node i holds sum_j W_ij x_j. Every matrix here is symmetric and doubly stochastic (rows
and columns sum to 1), so gossip keeps the nodes' average and, on a connected graph,
converges to it (Lian et al. 2017, "Can Decentralized Algorithms Outperform Centralized
Algorithms?"; Koloskova et al. 2020, "A Unified Theory of Decentralized SGD").

A topology: ``(k, round, seed, **options) -> W`` (options keyword-only, as for every registry);
``fits(k, **options)`` says, before any computation, why a topology cannot serve K nodes.
"""
from __future__ import annotations

from typing import Annotated, Callable

import numpy as np
import torch
from pydantic import Field

from pipeline.registry import Registry

TOPOLOGIES: Registry[Callable[..., torch.Tensor]] = Registry("topology")


def metropolis_hastings(adjacency: np.ndarray) -> torch.Tensor:
    """The Metropolis-Hastings weights of an undirected graph: W_ij = 1 / (1 + max(d_i, d_j))
    on each edge, the rest of each row on the diagonal (symmetric, doubly stochastic)."""
    a = np.asarray(adjacency, dtype=bool)
    np.fill_diagonal(a, False)
    degree = a.sum(1)
    w = np.where(a, 1.0 / (1.0 + np.maximum(degree[:, None], degree[None, :])), 0.0)
    np.fill_diagonal(w, 1.0 - w.sum(1))
    return torch.tensor(w, dtype=torch.float64)


@TOPOLOGIES.register("none")
def isolated(k: int, round_: int, seed: int) -> torch.Tensor:
    """No communication: each node keeps its own model (the one-shot case, merged at the end)."""
    return torch.eye(k, dtype=torch.float64)


@TOPOLOGIES.register("ring")
def ring(k: int, round_: int, seed: int) -> torch.Tensor:
    """Each node averages itself and its two neighbours on a cycle, 1/3 each (K >= 3)."""
    a = np.zeros((k, k), dtype=bool)
    for i in range(k):
        a[i, (i + 1) % k] = a[i, (i - 1) % k] = True
    return metropolis_hastings(a)


def torus_shape(k: int) -> tuple[int, int] | None:
    """The most square r x c = K with r, c >= 3 (each node then has four distinct neighbours)."""
    best = None
    for r in range(3, int(k ** 0.5) + 1):
        if k % r == 0 and k // r >= 3:
            best = (r, k // r)
    return best


@TOPOLOGIES.register("torus")
def torus(k: int, round_: int, seed: int) -> torch.Tensor:
    """A 2-D torus r x c = K (r, c >= 3): each node averages itself and its four grid
    neighbours (wrapping around), 1/5 each."""
    r, c = torus_shape(k)
    a = np.zeros((k, k), dtype=bool)
    for i in range(r):
        for j in range(c):
            n = i * c + j
            for di, dj in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                a[n, ((i + di) % r) * c + (j + dj) % c] = True
    return metropolis_hastings(a)


@TOPOLOGIES.register("random")
def random_gossip(k: int, round_: int, seed: int, *, peers: Annotated[int, Field(ge=1)] = 1) -> torch.Tensor:
    """A fresh random graph every round: each node picks ``peers`` others uniformly (seeded by
    (seed, round)); links are two-way; Metropolis-Hastings weights (Boyd et al. 2006,
    "Randomized Gossip Algorithms", in its synchronous form)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, round_, 7]))
    a = np.zeros((k, k), dtype=bool)
    for i in range(k):
        others = np.delete(np.arange(k), i)
        for j in rng.choice(others, peers, replace=False):
            a[i, j] = a[j, i] = True
    return metropolis_hastings(a)


@TOPOLOGIES.register("complete")
def complete(k: int, round_: int, seed: int) -> torch.Tensor:
    """Fully connected: every node becomes the average (FedAvg over all nodes, every round)."""
    return torch.full((k, k), 1.0 / k, dtype=torch.float64)


def fits(name: str, k: int, options: dict) -> str | None:
    """Why topology ``name`` cannot serve K nodes, or None."""
    if name == "ring" and k < 3:
        return f"a ring needs K >= 3 nodes, K = {k}"
    if name == "torus" and torus_shape(k) is None:
        return f"a torus needs K = r x c with r, c >= 3 (9, 12, 15, 16, ...), K = {k}"
    if name == "random" and options.get("peers", 1) >= k:
        return f"peers = {options.get('peers', 1)} must be below K = {k}"
    return None
