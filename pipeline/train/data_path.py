"""Where the images live while a stage trains, and how its batches reach the device.

``resident`` (airbench style): the images are one device tensor; a batch is an index
gather on the device, with no per-sample Python and no host-to-device copy per step.

``host``, for datasets that do not fit on the device: the images stay in host memory,
memory-mapped from the prepared safetensors file (so the page cache, not the process, holds
them). A torch DataLoader gathers each batch in worker processes, pins it, and it is copied
to the device without blocking. Labels are small and stay on the device either way.

Both paths take the same index batches from the same device permutation, and augmentation
and mixing run batched on the device in both, so they train identical models (tested).
``auto`` (pipeline.io.stage_io.choose_data_path) picks ``resident`` when the prepared file
takes at most half of the device's free memory.
"""
from __future__ import annotations

from typing import Iterable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset

PATHS = ("auto", "resident", "host")


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
