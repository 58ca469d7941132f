"""Partition a training set into K shards (federated-style client splits). Pure numpy.

A partitioner: ``(labels, num_shards, rng, **options) -> list of index arrays``, one per
shard, disjoint and together covering every index (complete). Indices within a shard are
sorted so a manifest reads the same however they were drawn.
"""
from __future__ import annotations

import hashlib
import json
from typing import Callable, Protocol

import numpy as np

from pipeline.registry import Registry


class Partitioner(Protocol):
    def __call__(self, labels: np.ndarray, num_shards: int, rng: np.random.Generator, **options) -> list[np.ndarray]: ...


PARTITIONERS: Registry[Callable] = Registry("partitioner")


def _redraw(draw: Callable[[], list[np.ndarray]], num_shards: int, min_shard_size: int, max_draws: int,
            what: str) -> list[np.ndarray]:
    """Repeat a random partition until every shard holds at least ``min_shard_size`` samples."""
    for _ in range(max_draws):
        shards = draw()
        if min(len(s) for s in shards) >= min_shard_size:
            return [np.sort(s) for s in shards]
    raise ValueError(
        f"no {what} in {max_draws} gave every one of {num_shards} shards >= {min_shard_size} samples; "
        "raise alpha, lower min_shard_size or use fewer shards"
    )


@PARTITIONERS.register("iid")
def iid(labels: np.ndarray, num_shards: int, rng: np.random.Generator, **_) -> list[np.ndarray]:
    """Uniformly random split into near-equal shards (McMahan et al. 2017, 'IID' setting)."""
    perm = rng.permutation(len(labels))
    return [np.sort(part) for part in np.array_split(perm, num_shards)]


@PARTITIONERS.register("dirichlet")
def dirichlet(
    labels: np.ndarray,
    num_shards: int,
    rng: np.random.Generator,
    alpha: float = 0.5,
    min_shard_size: int = 1,
    max_draws: int = 1000,
    **_,
) -> list[np.ndarray]:
    """Label skew, per class over shards: each class's samples are spread over the K shards
    with proportions ~ Dir(alpha * 1_K), so shard sizes differ too.

    The scheme of Yurochkin et al. 2019, "Bayesian Nonparametric Federated Learning of Neural
    Networks", used by NIID-Bench (Li, Diao, Chen & He 2022, "Federated Learning on Non-IID Data
    Silos: An Experimental Study") and most federated-learning code since. Small alpha -> each
    shard sees few classes; large alpha -> close to IID. The whole draw is repeated until every
    shard holds at least ``min_shard_size`` samples (as NIID-Bench does). For the scheme that
    draws each shard's class mix instead, see ``dirichlet_clients``.
    """
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    classes = np.unique(labels)

    def draw() -> list[np.ndarray]:
        shards: list[list[np.ndarray]] = [[] for _ in range(num_shards)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            p = rng.dirichlet(np.full(num_shards, alpha))
            cuts = (np.cumsum(p)[:-1] * len(idx)).astype(int)
            for k, part in enumerate(np.split(idx, cuts)):
                shards[k].append(part)
        return [np.concatenate(s) for s in shards]

    return _redraw(draw, num_shards, min_shard_size, max_draws, f"Dirichlet(alpha={alpha}) draw")


@PARTITIONERS.register("dirichlet_clients")
def dirichlet_clients(
    labels: np.ndarray,
    num_shards: int,
    rng: np.random.Generator,
    alpha: float = 0.5,
    min_shard_size: int = 1,
    **_,
) -> list[np.ndarray]:
    """Label skew, per shard: each shard's class mix is q_k ~ Dir(alpha * p), p the classes'
    share of the data, and the shards are equal in size.

    Hsu, Qi & Brown 2019, "Measuring the Effects of Non-Identical Data Distribution for
    Federated Visual Classification". Shard by shard, its N/K samples are drawn class by
    class from what is left, following q_k; when a class runs out, its share goes to the
    classes that remain (renormalised), so every sample is assigned exactly once.
    """
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    classes, counts = np.unique(labels, return_counts=True)
    pools = [list(rng.permutation(np.flatnonzero(labels == c))) for c in classes]
    left = counts.copy()
    prior = counts / counts.sum()
    sizes = [len(part) for part in np.array_split(np.arange(len(labels)), num_shards)]
    if min(sizes) < min_shard_size:
        raise ValueError(f"{num_shards} equal shards of {len(labels)} samples hold {min(sizes)} each, "
                         f"fewer than min_shard_size={min_shard_size}; use fewer shards")
    shards = []
    for size in sizes:
        q = rng.dirichlet(alpha * prior)
        take = np.zeros(len(classes), dtype=np.int64)
        need = size
        while need > 0:
            p = np.where(left > take, q, 0.0)
            p = p / p.sum() if p.sum() > 0 else (left > take) / (left > take).sum()
            draw = np.minimum(rng.multinomial(need, p), left - take)
            take += draw
            need -= int(draw.sum())
        shards.append(np.sort(np.concatenate(
            [np.array([pools[c].pop() for _ in range(n)], dtype=np.int64) for c, n in enumerate(take)])))
        left -= take
    return shards


@PARTITIONERS.register("pathological")
def pathological(
    labels: np.ndarray, num_shards: int, rng: np.random.Generator, classes_per_shard: int = 2, **_
) -> list[np.ndarray]:
    """Each shard holds exactly ``classes_per_shard`` classes (McMahan et al. 2017, non-IID).

    Classes are dealt to shards round-robin from a seeded shuffle, so every class is held
    by at least one shard when K * n >= C; each class's samples are split evenly among the
    shards that hold it.
    """
    classes = rng.permutation(np.unique(labels))
    n_classes = len(classes)
    if classes_per_shard > n_classes:
        raise ValueError(f"classes_per_shard={classes_per_shard} exceeds the {n_classes} classes")
    if num_shards * classes_per_shard < n_classes:
        raise ValueError(
            f"{num_shards} shards x {classes_per_shard} classes cannot cover {n_classes} classes; "
            "raise classes_per_shard or the number of shards"
        )
    holders: dict[int, list[int]] = {int(c): [] for c in classes}
    for k in range(num_shards):
        for j in range(classes_per_shard):
            holders[int(classes[(k * classes_per_shard + j) % n_classes])].append(k)
    shards: list[list[np.ndarray]] = [[] for _ in range(num_shards)]
    for c, ks in holders.items():
        idx = rng.permutation(np.flatnonzero(labels == c))
        for k, part in zip(ks, np.array_split(idx, len(ks))):
            shards[k].append(part)
    return [np.sort(np.concatenate(s)) if s else np.empty(0, dtype=np.int64) for s in shards]


@PARTITIONERS.register("quantity_skew")
def quantity_skew(
    labels: np.ndarray,
    num_shards: int,
    rng: np.random.Generator,
    alpha: float = 0.5,
    min_shard_size: int = 1,
    max_draws: int = 1000,
    **_,
) -> list[np.ndarray]:
    """Quantity skew: shard sizes are Dir(alpha * 1_K) proportions of the data, and samples
    are assigned at random, so labels stay IID and only the amount of data differs
    (Li, Diao, Chen & He 2022, "Federated Learning on Non-IID Data Silos: An Experimental
    Study" (NIID-Bench)). Redrawn until every shard holds at least ``min_shard_size``."""
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    n = len(labels)

    def draw() -> list[np.ndarray]:
        p = rng.dirichlet(np.full(num_shards, alpha))
        return np.split(rng.permutation(n), (np.cumsum(p)[:-1] * n).astype(int))

    return _redraw(draw, num_shards, min_shard_size, max_draws, f"Dirichlet(alpha={alpha}) draw of shard sizes")


def label_histograms(labels: np.ndarray, shards: list[np.ndarray], num_classes: int) -> np.ndarray:
    """(K, C) counts of each class in each shard."""
    return np.stack([np.bincount(labels[s], minlength=num_classes) for s in shards])


def partition_hash(shards: list[np.ndarray]) -> str:
    """Content hash of the index lists: equal hashes mean the same partition."""
    canon = json.dumps([s.tolist() for s in shards], separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()
