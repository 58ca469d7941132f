"""The fixed-size, seeded subsets that keep evaluation's cost flat as the data grows (the
probes' training images, BatchNorm's recalibration images, the interpolation curves' test images)."""
from __future__ import annotations

import torch


def fixed_subset(n: int, size: int, seed: int) -> torch.Tensor:
    """Sorted indices of a seeded random subset of ``size`` of ``n`` items (all when n <= size)."""
    if n <= size:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:size].sort().values
