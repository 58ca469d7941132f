"""A minimal training loop: batches from a seeded device permutation, served by a
pipeline.train.data_path.BatchSource (device-resident, or a DataLoader from host memory); the
loss function receives the batch and decides about augmentation and mixing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from pipeline.nn.inference import autocast
from pipeline.train.data_path import BatchSource


@dataclass(frozen=True)
class Schedule:
    epochs: int
    batch_size: int
    lr: float
    momentum: float = 0.9
    weight_decay: float = 5e-4
    cosine: bool = True  # cosine learning rate over the run; False: constant (federated rounds)
    nesterov: bool = True  # with momentum; federated clients use heavy ball, as their authors' SGD


def lr_scheduler(opt: torch.optim.Optimizer, schedule: Schedule, n: int) -> torch.optim.lr_scheduler.LRScheduler:
    """The schedule's learning rate per step for a run over ``n`` samples: torch's own
    CosineAnnealingLR, or a constant rate."""
    if schedule.cosine:
        return torch.optim.lr_scheduler.CosineAnnealingLR(
            opt, T_max=schedule.epochs * steps_per_epoch(n, schedule.batch_size))
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)


def batches(n: int, batch_size: int, g: torch.Generator, device: torch.device) -> Iterator[torch.Tensor]:
    """Index batches of one shuffled epoch; the last partial batch is kept if it has >= 2 samples
    (BatchNorm in train mode needs more than one value per channel)."""
    perm = torch.randperm(n, generator=g, device=device)
    for start in range(0, n, batch_size):
        idx = perm[start : start + batch_size]
        if len(idx) >= 2:
            yield idx


def steps_per_epoch(n: int, batch_size: int) -> int:
    """How many batches `batches` yields per epoch (a last batch of one is dropped)."""
    return max(1, sum(1 for s in range(0, n, batch_size) if min(batch_size, n - s) >= 2))


def fit(
    params: Iterable[nn.Parameter],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    source: BatchSource,
    schedule: Schedule,
    g: torch.Generator,
    device: torch.device,
    on_epoch: Callable[[int, float], None] | None = None,
) -> list[float]:
    """SGD with (Nesterov) momentum and a per-step cosine (or constant) learning rate.

    ``loss_fn(x_batch, y_batch) -> scalar loss``. Returns the mean loss of each epoch; the
    running sum stays on the device and is read once per epoch (no per-step sync).
    """
    params = [p for p in params if p.requires_grad]
    opt = torch.optim.SGD(
        params, lr=schedule.lr, momentum=schedule.momentum, nesterov=schedule.nesterov and schedule.momentum > 0,
        weight_decay=schedule.weight_decay,
    )
    n = len(source)
    sched = lr_scheduler(opt, schedule, n)
    history = []
    for epoch in range(1, schedule.epochs + 1):
        total, count = torch.zeros((), device=device), 0
        for xb, yb in source.epoch(batches(n, schedule.batch_size, g, device)):
            with autocast(device):
                loss = loss_fn(xb, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.detach().float()
            count += 1
        history.append(total.item() / max(count, 1))
        if on_epoch is not None:
            on_epoch(epoch, history[-1])
    return history
