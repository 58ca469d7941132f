"""What every merger shares: the registry, the merger signature and the tensor-by-tensor loops.

A merger: ``(experts, base, weights, **options) -> state_dict`` where ``experts`` are K
state dicts of one architecture, ``base`` the pretrained state dict they were fine-tuned
from, ``weights`` the experts' data-size weights (sum 1). Options are keyword-only and
annotated; config validation builds its checks from these signatures. A merger that needs
data (Fisher, RegMean, greedy soup) also takes ``data`` (a pipeline.methods.merge.data.MergeData),
and one that draws randomness takes ``seed`` (base.seed; pipeline.train.engine.combine passes both).

Merges go tensor by tensor: only the K copies of one tensor are stacked at a time, never
whole models. Integer buffers (BatchNorm's num_batches_tracked) are taken from expert 0;
float buffers (BatchNorm running statistics) are averaged and should be recomputed after
merging (see pipeline.nn.batchnorm).
"""
from __future__ import annotations

from typing import Annotated, Callable

import torch
from pydantic import Field

from pipeline.registry import Registry

StateDict = dict[str, torch.Tensor]
MERGERS: Registry[Callable[..., StateDict]] = Registry("merger")

Fraction = Annotated[float, Field(gt=0, le=1)]
Scale = Annotated[float, Field(gt=0)]


def each_tensor(experts: list[StateDict], merge_one: Callable[[str, torch.Tensor], torch.Tensor]) -> StateDict:
    """The loop every merger shares: ``merge_one(key, expert 0's tensor)`` gives the merged
    float tensor, cast back to the experts' dtype; integer buffers (BatchNorm's
    num_batches_tracked) are taken from expert 0."""
    check_same_keys(experts)
    return {key: merge_one(key, first).to(first.dtype) if first.is_floating_point() else first.clone()
            for key, first in experts[0].items()}


def per_tensor(experts: list[StateDict], combine: Callable[[str, torch.Tensor], torch.Tensor],
                base: StateDict | None = None) -> StateDict:
    """Apply ``combine(key, (K, *shape) stack)`` one tensor at a time (for merges that need
    all K values of a parameter at once, like TIES's sign election). With ``base``, the stack
    of a learned tensor holds the task vectors ``expert - base`` instead of the experts.

    Every stack lives in one buffer, reused from tensor to tensor: a fresh stack of a large
    tensor (over glibc's 32 MiB mmap ceiling, see pipeline.runtime.allocator) would fault in every
    page again. ``combine`` may work in the stack in place; what it returns is copied out of
    the buffer if it is a view into it."""
    k = len(experts)
    largest = max((t.numel() for t in experts[0].values()), default=0) if experts else 0
    buffers: dict[torch.device, torch.Tensor] = {}

    def merge_one(key: str, first: torch.Tensor) -> torch.Tensor:
        buffer = buffers.setdefault(first.device, torch.empty(k * largest, device=first.device))
        stacked = buffer[: k * first.numel()].view(k, *first.shape)
        theta0 = base[key].float() if base is not None and not is_running_stat(key) else None
        for row, e in zip(stacked, experts):
            if theta0 is None:
                row.copy_(e[key])
            else:
                torch.sub(e[key], theta0, out=row)  # the task vector in one pass
        merged = combine(key, stacked)
        return merged.clone() if merged.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr() else merged

    return each_tensor(experts, merge_one)


def weighted_sum(experts: list[StateDict], weights: list[float]) -> StateDict:
    """sum_k w_k * expert_k, accumulated in place tensor by tensor: each expert tensor is
    read once and nothing of size K x tensor is ever built (memory-bound, no stacking)."""

    def merge_one(key: str, first: torch.Tensor) -> torch.Tensor:
        acc = first.float() * weights[0]
        for e, w in zip(experts[1:], weights[1:]):
            acc.add_(e[key], alpha=w)
        return acc

    return each_tensor(experts, merge_one)


def check_same_keys(experts: list[StateDict]) -> None:
    if not experts:
        raise ValueError("nothing to merge: no experts given")
    keys = list(experts[0])
    for i, e in enumerate(experts[1:], 1):
        if list(e) != keys:
            raise ValueError(f"expert {i} has different tensors than expert 0")


def is_running_stat(key: str) -> bool:
    return key.endswith("running_mean") or key.endswith("running_var")


def task_vector_merge(
    experts: list[StateDict], base: StateDict | None, combine_deltas: Callable[[str, torch.Tensor], torch.Tensor]
) -> StateDict:
    """base + combine_deltas(name, (K, *shape) task vectors), tensor by tensor."""
    if base is None:
        raise ValueError("this merger needs the pretrained base model")

    def combine(key: str, stacked: torch.Tensor) -> torch.Tensor:
        if is_running_stat(key):  # statistics, not learned weights: no task vector
            return stacked.mean(0)
        return base[key].float() + combine_deltas(key, stacked)

    return per_tensor(experts, combine, base)


def needs_data(data, name: str):
    if data is None:
        raise ValueError(f"{name} needs data (the experts' shards and the validation split)")
    return data


