"""Train K copies of one architecture at once: parameters stacked on a leading K axis, one
vmapped forward and backward per step (torch.func.functional_call + vmap).

Each expert follows exactly the trajectory `training.fit` would give it on its own: its own
batch order (its generator), its own number of steps per epoch (shards differ in size), its
own cosine learning-rate schedule and its own stream of mixing randomness (each model's
recipe draws from a generator of its own).
At each step the experts that still have a batch are grouped by batch size (the last batch
of an epoch is smaller) and each group runs as one vmapped call.

BatchNorm under vmap: in train mode BatchNorm updates its running statistics in place, and
vmap allows that only when the buffers are batched too. So buffers are stacked like the
parameters and passed through functional_call; each expert's statistics then match the
one-by-one run. (functorch's replace_all_batch_norm_modules_ would drop running statistics
altogether.)

The optimiser step is written here, not torch.optim.SGD: a stacked parameter holds K experts,
and SGD cannot give its rows different learning rates or skip the rows of experts that
have no batch at this step. The update is SGD's own (PyTorch's formula, in its order):
    g += weight_decay * p;  buf = momentum * buf + g  (buf = g at the first step);
    g = g + momentum * buf (Nesterov, the default) or buf (heavy ball);  p -= lr * g
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
from torch import nn
from torch.func import functional_call, vmap

from pipeline.train.data_path import BatchSource
from pipeline.nn.inference import autocast
from pipeline.train.loop import Schedule, batches, lr_scheduler, steps_per_epoch

if TYPE_CHECKING:  # a type only: mix_train runs without the client algorithms
    from pipeline.methods.federated.clients import LocalTerms

StateDict = dict[str, torch.Tensor]
# forward(params, buffers, inputs) -> (features, logits) for models stacked on a leading axis;
# in train mode it updates ``buffers`` (BatchNorm's running statistics) in place.
StackedForward = Callable[[StateDict, StateDict, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class FeaturesAndLogits(nn.Module):
    """``model`` answering (features, logits): the same operations as its forward (every
    architecture's forward is classifier(features(x))), so client algorithms that read the
    representation (MOON) cost no second pass. Parameter names gain the prefix ``model.``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.model.features(x)
        return features, self.model.classifier(features)


def prefixed(tensors: StateDict) -> StateDict:
    return {f"model.{n}": t for n, t in tensors.items()}


def client_losses(forward: StackedForward, params: StateDict, buffers: StateDict, inputs: torch.Tensor,
                  targets: torch.Tensor, loss: Callable, terms: LocalTerms | None, members: list[int]) -> torch.Tensor:
    """Each model's loss on its batch, (m,): the recipe's loss plus the client algorithm's terms
    (pipeline.methods.federated.LocalTerms). Both training paths call this, so they train
    the same objective."""
    if terms is not None and terms.perturbation is not None:
        # FedSoL: the first pass (inside the perturbation) moves BatchNorm's statistics; the
        # loss is taken at the perturbed weights on a copy, as the authors' SAM second pass.
        e = terms.perturbation(lambda p, x: forward(p, buffers, x), params, inputs, targets, members)
        features, logits = forward({n: p + e[n] for n, p in params.items()},
                                   {n: b.clone() for n, b in buffers.items()}, inputs)
    else:
        features, logits = forward(params, buffers, inputs)
    losses = vmap(loss)(logits.float(), targets)
    if terms is None:
        return losses
    if terms.output_term is not None:
        def reference(p: StateDict, x: torch.Tensor):
            with torch.no_grad():
                return forward(p, {n: b.clone() for n, b in buffers.items()}, x)

        losses = losses + terms.output_term(reference, inputs, features.float(), logits.float(), targets, members)
    if terms.penalty is not None:
        losses = losses + terms.penalty(params, members)
    return losses


def _lr_schedules(k: int, schedule: Schedule, sizes: list[int]):
    """torch's own learning-rate scheduler per expert, on a placeholder optimiser, read each step."""
    out = []
    for i in range(k):
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=schedule.lr)
        out.append((opt, lr_scheduler(opt, schedule, sizes[i])))
    return out


def fit_stacked(
    model: nn.Module,
    inits: list[StateDict],
    data: list[BatchSource],
    prepare_batch: Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    schedule: Schedule,
    generators: list[torch.Generator],
    device: torch.device,
    on_epoch: Callable[[int, list[float]], None] | None = None,
    on_epoch_states: Callable[[int, list[StateDict]], None] | None = None,
    compile: bool = False,
    terms: LocalTerms | None = None,
) -> tuple[list[StateDict], list[list[float]]]:
    """Fine-tune K experts from ``inits`` on ``data[k]`` (expert k's shard).

    ``prepare_batch(k, x, y) -> (inputs, targets)`` builds expert k's batch (mixing);
    ``loss(logits, targets) -> scalar`` must be vmappable. ``terms`` (a client algorithm's
    LocalTerms), if given, join each model's loss (client_losses). ``model`` supplies the
    architecture only. Returns the K final state dicts and each expert's per-epoch mean loss.
    ``compile`` runs the vmapped forward through torch.compile.
    """
    k_experts = len(inits)
    model = model.to(device).train()
    names_p = [n for n, _ in model.named_parameters()]
    names_b = [n for n, _ in model.named_buffers()]
    params = {n: torch.stack([s[n] for s in inits]).to(device).requires_grad_() for n in names_p}
    buffers = {n: torch.stack([s[n] for s in inits]).to(device) for n in names_b}
    momentum_buf: dict[str, torch.Tensor | None] = {n: None for n in names_p}
    sizes = [len(source) for source in data]
    lrs = _lr_schedules(k_experts, schedule, sizes)
    stepped = [0] * k_experts  # steps taken by each expert (its momentum buffer exists after the first)

    wrapped = FeaturesAndLogits(model)

    def forward(p, b, x):
        return functional_call(wrapped, (prefixed(p), prefixed(b)), (x,))

    vmapped = torch.compile(vmap(forward)) if compile else vmap(forward)

    def stacked_forward(p, b, x):
        with autocast(device):
            return vmapped(p, b, x)

    history: list[list[float]] = [[] for _ in range(k_experts)]
    for epoch in range(1, schedule.epochs + 1):
        streams = [data[i].epoch(batches(sizes[i], schedule.batch_size, generators[i], device))
                   for i in range(k_experts)]
        steps = [steps_per_epoch(size, schedule.batch_size) for size in sizes]
        totals = [torch.zeros((), device=device) for _ in range(k_experts)]
        for step in range(max(steps)):
            active = [i for i in range(k_experts) if step < steps[i]]
            batch = {i: next(streams[i]) for i in active}
            for p in params.values():
                p.grad = None
            groups: dict[int, list[int]] = {}
            for i in active:
                groups.setdefault(len(batch[i][1]), []).append(i)
            for members in groups.values():
                built = [prepare_batch(i, *batch[i]) for i in members]
                xs = torch.stack([b[0] for b in built])
                ts = torch.stack([b[1] for b in built])
                whole = len(members) == k_experts
                rows = None if whole else torch.tensor(members, device=device)
                p_sub = params if whole else {n: v[rows] for n, v in params.items()}
                b_sub = buffers if whole else {n: v[rows].clone() for n, v in buffers.items()}
                losses = client_losses(stacked_forward, p_sub, b_sub, xs, ts, loss, terms, members)
                losses.sum().backward()
                if not whole:
                    for n, v in buffers.items():
                        v[rows] = b_sub[n]
                for j, i in enumerate(members):
                    totals[i] += losses[j].detach()
            _sgd_step(params, momentum_buf, active, [lrs[i][0].param_groups[0]["lr"] for i in active],
                      [stepped[i] > 0 for i in active], schedule)
            for i in active:
                stepped[i] += 1
                lrs[i][0].step()  # a no-op (no gradients); keeps the scheduler's step-order check quiet
                lrs[i][1].step()
        for i in range(k_experts):
            history[i].append(totals[i].item() / steps[i])
        if on_epoch is not None:
            on_epoch(epoch, [h[-1] for h in history])
        if on_epoch_states is not None:  # views of each model's current weights, not copies
            on_epoch_states(epoch, [{**{n: params[n][i].detach() for n in names_p}, **{n: buffers[n][i] for n in names_b}}
                                    for i in range(k_experts)])

    states = []
    for i in range(k_experts):
        state = {n: params[n][i].detach().clone() for n in names_p}
        state.update({n: buffers[n][i].clone() for n in names_b})
        states.append({n: state[n] for n in model.state_dict()})
    return states, history


@torch.no_grad()
def _sgd_step(params, momentum_buf, active: list[int], lrs: list[float], has_buf: list[bool], s: Schedule) -> None:
    device = next(iter(params.values())).device
    lr = torch.tensor(lrs, dtype=torch.float32, device=device)
    if len(active) == next(iter(params.values())).shape[0] and all(has_buf):  # every expert steps
        _sgd_step_all(params, momentum_buf, lr, s)
        return
    rows = torch.tensor(active, device=device)
    for n, p in params.items():
        grad = p.grad[rows].add(p[rows], alpha=s.weight_decay) if s.weight_decay else p.grad[rows]
        if s.momentum:
            buf = momentum_buf[n]
            if buf is None:
                buf = momentum_buf[n] = torch.zeros_like(p)
            started = torch.tensor(has_buf, device=rows.device).view(-1, *([1] * (p.ndim - 1)))
            new_buf = torch.where(started, buf[rows].mul(s.momentum).add(grad), grad)
            buf[rows] = new_buf
            grad = grad.add(new_buf, alpha=s.momentum) if s.nesterov else new_buf
        p[rows] = p[rows] - lr.view(-1, *([1] * (p.ndim - 1))) * grad


def _sgd_step_all(params, momentum_buf, lr: torch.Tensor, s: Schedule) -> None:
    """_sgd_step's arithmetic, in place, when every expert steps and has its momentum buffer
    (every step but the first of a run and the tails of uneven shards): no row gathers and
    scatters, the same values."""
    for n, p in params.items():
        grad = p.grad.add(p, alpha=s.weight_decay) if s.weight_decay else p.grad
        if s.momentum:
            buf = momentum_buf[n].mul_(s.momentum).add_(grad)
            grad = grad.add(buf, alpha=s.momentum) if s.nesterov else buf
        p.sub_(lr.view(-1, *([1] * (p.ndim - 1))) * grad)
