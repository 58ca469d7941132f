"""What data-dependent mergers need from the data, computed lazily and cached per expert.

Fisher merging needs each expert's diagonal Fisher on its own shard; RegMean needs the Gram
matrices of the inputs each linear/conv layer sees on the expert's shard; greedy soup needs
validation accuracy of candidate soups. Mergers that take a ``data`` argument receive a
MergeData; merging.py itself stays free of data handling.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from pipeline.nn.batchnorm import recalibrate
from pipeline.nn.inference import to_model_device
from pipeline.nn.inference import predict_logits

StateDict = dict[str, torch.Tensor]


class MergeData:
    def __init__(self, model: nn.Module, shards: list[tuple[torch.Tensor, torch.Tensor]],
                 x_val: torch.Tensor, y_val: torch.Tensor, x_recalibrate: torch.Tensor | None,
                 bn_batch_size: int = 256, seed: int = 0):
        self.model, self.shards = model, shards
        self.x_val, self.y_val = x_val, y_val
        self.x_recalibrate, self.bn_batch_size, self.seed = x_recalibrate, bn_batch_size, seed
        self._cache: dict[tuple, object] = {}
        self.notes: dict[str, object] = {}  # what a merger chose, for the checkpoint metadata

    def _cached(self, key: tuple, compute: Callable[[], object]):
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    def fisher(self, k: int, state: StateDict, samples: int) -> StateDict:
        return self._cached(("fisher", k, samples), lambda: diagonal_fisher(
            self.model, state, self.shards[k][0][:samples], torch.Generator(state_device(state)).manual_seed(self.seed + k)))

    def grams(self, k: int, state: StateDict) -> dict[str, torch.Tensor]:
        return self._cached(("grams", k), lambda: input_grams(self.model, state, self.shards[k][0]))

    def val_accuracy(self, state: StateDict) -> float:
        """Validation accuracy of a candidate, BatchNorm statistics recomputed first."""
        self.model.load_state_dict(state)
        if self.x_recalibrate is not None:
            recalibrate(self.model, self.x_recalibrate, self.bn_batch_size)
        return float((predict_logits(self.model, self.x_val).argmax(1) == self.y_val).float().mean())


def state_device(state: StateDict) -> torch.device:
    return next(iter(state.values())).device


def diagonal_fisher(model: nn.Module, state: StateDict, x: torch.Tensor, g: torch.Generator,
                    chunk: int = 32) -> StateDict:
    """E_x E_{y ~ p(y|x)} [(d log p(y|x) / d theta)^2] for each parameter: per-example
    gradients (vmap over grad), one label per example sampled from the model's own
    prediction, as Matena & Raffel's Monte-Carlo estimate does. BatchNorm in eval mode, so
    each example is its own forward pass."""
    model.load_state_dict(state)
    model.eval()
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b for n, b in model.named_buffers()}

    def log_prob(p, xi, yi):
        logits = functional_call(model, (p, buffers), (xi[None],))
        return logits.log_softmax(-1)[0].gather(0, yi[None])[0]

    per_example = vmap(grad(log_prob), in_dims=(None, 0, 0))
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    for start in range(0, len(x), chunk):
        xb = to_model_device(x[start : start + chunk], model)
        with torch.no_grad():
            probs = functional_call(model, (params, buffers), (xb,)).softmax(-1)
        yb = torch.multinomial(probs, 1, generator=g).squeeze(1)
        for n, gr in per_example(params, xb, yb).items():
            total[n] += (gr**2).sum(0)
    return {n: t / max(len(x), 1) for n, t in total.items()}


def weight_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The Linear and Conv2d layers RegMean solves for, by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


@torch.no_grad()
def input_grams(model: nn.Module, state: StateDict, x: torch.Tensor, batch_size: int = 256) -> dict[str, torch.Tensor]:
    """X^T X of each layer's inputs over the shard. A conv layer's inputs are its unfolded
    patches (in_channels * kh * kw per position), so the conv is a linear map on them."""
    model.load_state_dict(state)
    model.eval()
    layers = weight_layers(model)
    grams: dict[str, torch.Tensor] = {}

    def hook(name, module):
        def record(_, inputs):
            a = inputs[0].float()
            if isinstance(module, nn.Conv2d):
                a = F.unfold(a, module.kernel_size, module.dilation, module.padding, module.stride)
                a = a.transpose(1, 2).reshape(-1, a.shape[1])
            gram = a.T @ a
            grams[name] = grams[name] + gram if name in grams else gram
        return record

    handles = [m.register_forward_pre_hook(hook(n, m)) for n, m in layers.items()]
    try:
        for start in range(0, len(x), batch_size):
            model(to_model_device(x[start : start + batch_size], model))
    finally:
        for h in handles:
            h.remove()
    return grams
