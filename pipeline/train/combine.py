"""Combine K states into one with any registered merger: the other call (beside
pipeline.train.engine.train_models) that one-shot merging and every round are built from.

A merger gets what its signature asks for: the data-aware mergers (Fisher, RegMean, greedy
soup) ``data``, the ones that draw randomness (DARE, DARE-TIES) ``seed``.
"""
from __future__ import annotations

import inspect

import torch

from pipeline.methods.merge import MERGERS, StateDict


def merger_takes(method: str, argument: str) -> bool:
    """Whether the registered merger ``method`` takes ``argument`` (``data`` or ``seed``)."""
    return argument in inspect.signature(MERGERS[method]).parameters


def combine(method: str, experts: list[StateDict], base: StateDict | None, weights: torch.Tensor,
            options: dict | None = None, *, data=None, seed: int = 0) -> StateDict:
    """Merge K state dicts with the registered merger ``method`` and its ``options``.
    ``data`` (a MergeData) reaches the mergers that need it, ``seed`` those that draw."""
    extra = {}
    if merger_takes(method, "data"):
        if data is None:
            raise ValueError(f"merger {method} needs data (the experts' shards and the validation split)")
        extra["data"] = data
    if merger_takes(method, "seed"):
        extra["seed"] = seed
    return MERGERS[method](experts, base, weights, **extra, **(options or {}))
