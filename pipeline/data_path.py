"""Where the images live while a stage trains, and how its batches reach the device.

``resident`` (airbench style): the images are one device tensor; a batch is an index
gather on the device, with no per-sample Python and no host-to-device copy per step.

``host``, for datasets that do not fit on the device: the images stay in host memory,
memory-mapped from the prepared safetensors file (so the page cache, not the process, holds
them). A torch DataLoader gathers each batch in worker processes, pins it, and it is copied
to the device without blocking. Labels are small and stay on the device either way.

Both paths take the same index batches from the same device permutation, and augmentation
and mixing run batched on the device in both, so they train identical models (tested).
``auto`` picks ``resident`` when the prepared file takes at most half of the device's free
memory.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset

PATHS = ("auto", "resident", "host")


def free_memory(device: torch.device) -> int:
    """Free bytes on ``device``: the CUDA allocator's view, or the host's available RAM."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def choose(path: str, dataset_file: str | Path, device: torch.device) -> str:
    """``resident`` or ``host`` for the configured ``path`` (auto decides by size)."""
    if path != "auto":
        return path
    return "resident" if Path(dataset_file).stat().st_size <= free_memory(device) // 2 else "host"


def to_model_device(x: torch.Tensor, model: torch.nn.Module) -> torch.Tensor:
    """``x`` (a slice of a split, perhaps in host memory) on the device of ``model``."""
    return x.to(next(model.parameters()).device, non_blocking=True)


class _Gather(Dataset):
    """Indexed by a whole batch of indices at once: one gather per batch, not per sample."""

    def __init__(self, x: torch.Tensor):
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, idx: torch.Tensor) -> torch.Tensor:
        return self.x[idx]


class BatchSource:
    """A training set's images and labels, served as device batches for given index batches."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, device: torch.device, path: str = "resident",
                 workers: int = 0):
        if path not in ("resident", "host"):
            raise ValueError(f"data path must be resident or host, got {path!r}")
        self.resident = path == "resident"
        self.x = x.to(device) if self.resident else x.cpu()
        self.y, self.device, self.workers = y.to(device), device, workers

    def __len__(self) -> int:
        return len(self.y)

    def epoch(self, index_batches: Iterable[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.resident:
            for idx in index_batches:
                yield self.x[idx], self.y[idx]
            return
        plan = list(index_batches)
        if not plan:
            return
        # The device indices reach the host in one transfer for the whole epoch, not one per batch.
        host_plan = list(torch.cat(plan).cpu().split([len(idx) for idx in plan]))
        # batch_size=None: each "sample" the sampler yields is a whole index batch. A generator
        # of its own, because a DataLoader draws its workers' seed from the global RNG otherwise,
        # and the mixers' randomness comes from there.
        loader = DataLoader(_Gather(self.x), sampler=host_plan, batch_size=None, num_workers=self.workers,
                            pin_memory=self.device.type == "cuda", generator=torch.Generator())
        for idx, xb in zip(plan, loader):
            yield xb.to(self.device, non_blocking=True), self.y[idx]
