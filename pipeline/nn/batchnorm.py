"""Recompute BatchNorm running statistics of a merged model.

Why: each expert's running mean/variance describe that expert's own activations. A merged
model's pre-BN activations have different statistics (averaging weights that disagree
shrinks their variance, the 'variance collapse' of Jordan et al. 2023, REPAIR), so the
averaged running statistics mis-normalise and accuracy can collapse. Forward passes over
training data in train mode, with a cumulative average (momentum=None), restore the
statistics the merged weights actually produce, at the cost of one pass and no training.
"""
from __future__ import annotations

import torch
from torch import nn

from pipeline.nn.inference import to_model_device


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@torch.no_grad()
def recalibrate(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> nn.Module:
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return model
    saved = [(m, m.momentum) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over all batches
    was_training = model.training
    model.train()
    for start in range(0, len(x), batch_size):
        batch = x[start : start + batch_size]
        if len(batch) >= 2:
            model(to_model_device(batch, model))
    for m, momentum in saved:
        m.momentum = momentum
    model.train(was_training)
    return model
