"""Train K models from K start states: one of the two calls every way of combining models
is built from (the other, combining K states into one, is pipeline.train.combine). mix_train
is one call of train_models, merge one call of combine per merger; federated and
decentralised rounds repeat the pair.

``train_models`` trains model i from ``inits[i]`` on ``sources[i]`` with ``recipes[i]``
(its batch builder and loss, with its own random stream), stacked and vmapped when every
recipe allows it (pipeline.train.stacked), one after another with torch's own SGD
(pipeline.train.loop.fit) when a recipe hooks the model (manifold mixup) or when asked.
Either way each model follows the same trajectory: its own batch order, its own learning-rate
schedule and its own mixing draws, equal within float tolerance (tests/test_stacked.py).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Protocol

import torch
from torch import nn

from pipeline.nn.models import channels_last
from pipeline.train.data_path import BatchSource
from pipeline.train.loop import Schedule, fit
from pipeline.train.stacked import FeaturesAndLogits, StateDict, client_losses, fit_stacked, prefixed

if TYPE_CHECKING:  # a type only: mix_train runs without the client algorithms
    from pipeline.methods.federated.clients import LocalTerms


class Recipe(Protocol):
    """How one model builds and scores its batches (pipeline.methods.mix.MixRecipe is one)."""

    mixes_hidden_layers: bool
    loss_key: tuple  # recipes with one loss_key compute the same loss (stacking shares one)

    def batch(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor: ...

    def attach(self, model: nn.Module) -> list: ...


# on_epoch(epoch, {model index: that epoch's mean loss}) after each epoch of each model
EpochCallback = Callable[[int, dict[int, float]], None]
# after_epoch(epoch, {model index: its weights now}) after each epoch, for per-epoch validation:
# the states are views of the weights being trained, to be read, not kept or changed
EpochStates = Callable[[int, dict[int, StateDict]], None]


def can_stack(recipes: list[Recipe]) -> bool:
    """Stacking needs more than one model, one shared loss function, and no hooks in the model."""
    return (len(recipes) > 1 and not any(r.mixes_hidden_layers for r in recipes)
            and len({r.loss_key for r in recipes}) == 1)


def train_models(
    model: nn.Module,
    inits: list[StateDict],
    sources: list[BatchSource],
    recipes: list[Recipe],
    schedule: Schedule,
    generators: list[torch.Generator],
    device: torch.device,
    *,
    stack: bool | None = None,
    on_epoch: EpochCallback | None = None,
    after_epoch: EpochStates | None = None,
    compile: bool = False,
    terms: LocalTerms | None = None,
) -> tuple[list[StateDict], list[list[float]]]:
    """Train K models; returns their final state dicts and per-epoch mean losses.

    ``model`` supplies the architecture (its weights are overwritten); ``generators[i]`` draws
    model i's batch order. ``stack``: None decides by ``can_stack``, False forces one after
    another, True insists on stacking (a ValueError when the recipes cannot be stacked).
    ``terms`` (a client algorithm's LocalTerms: parameter-space penalties, output-space terms,
    a weight perturbation) join each model's loss, the same on either path (model i is
    member i)."""
    if not (len(inits) == len(sources) == len(recipes) == len(generators)):
        raise ValueError("train_models needs one start state, data source, recipe and generator per model")
    stacked = can_stack(recipes) if stack is None else stack
    if stacked and not can_stack(recipes):
        raise ValueError("these recipes cannot be trained stacked (one model, a hooked layer or different losses)")
    if stacked:
        return fit_stacked(
            model, inits, sources, lambda i, x, y: recipes[i].batch(x, y), recipes[0].loss, schedule,
            generators, device,
            on_epoch=None if on_epoch is None else lambda e, losses: on_epoch(e, dict(enumerate(losses))),
            on_epoch_states=None if after_epoch is None else lambda e, states: after_epoch(e, dict(enumerate(states))),
            compile=compile, terms=terms,
        )
    states, histories = [], []
    for i, (init, source, recipe, g) in enumerate(zip(inits, sources, recipes, generators)):
        def each_epoch(e: int, loss: float, i: int = i) -> None:
            if on_epoch is not None:
                on_epoch(e, {i: loss})
            if after_epoch is not None:
                after_epoch(e, {i: model.state_dict()})

        state, history = _train_one(model, init, source, recipe, schedule, g, device, compile, each_epoch, terms, i)
        states.append(state)
        histories.append(history)
    return states, histories


def _train_one(model: nn.Module, init: StateDict, source: BatchSource, recipe: Recipe, schedule: Schedule,
               g: torch.Generator, device: torch.device, compile: bool,
               on_epoch: Callable[[int, float], None] | None,
               terms: LocalTerms | None = None, member: int = 0,
               ) -> tuple[StateDict, list[float]]:
    """One model with torch's own optimiser and scheduler (loop.fit)."""
    model.load_state_dict(init)
    model = channels_last(model)
    model.train()
    forward = torch.compile(model) if compile else model  # shares the model's parameters

    def loss_fn(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        inputs, targets = recipe.batch(xb, yb)
        if terms is None or terms.empty:
            return recipe.loss(forward(inputs), targets)
        # a client algorithm's terms: the stacked path's arithmetic on a stack of one model
        wrapped = FeaturesAndLogits(model)

        def one(p: StateDict, b: StateDict, x: torch.Tensor):
            f, z = torch.func.functional_call(wrapped, (prefixed({n: t[0] for n, t in p.items()}),
                                                        prefixed({n: t[0] for n, t in b.items()})), (x[0],))
            return f.unsqueeze(0), z.unsqueeze(0)

        params = {n: p.unsqueeze(0) for n, p in model.named_parameters()}
        buffers = {n: b.unsqueeze(0) for n, b in model.named_buffers()}  # views: updates reach the model
        return client_losses(one, params, buffers, inputs.unsqueeze(0), targets.unsqueeze(0), recipe.loss,
                             terms, [member])[0]

    hooks = recipe.attach(model)
    try:
        history = fit(model.parameters(), loss_fn, source, schedule, g, device, on_epoch=on_epoch)
    finally:
        for h in hooks:
            h.remove()
    return {n: t.detach().clone() for n, t in model.state_dict().items()}, history
