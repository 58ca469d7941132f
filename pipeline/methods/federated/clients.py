"""Client algorithms of federated learning: what a client adds to its local training, what it
remembers between rounds, and what the server does with that.

A client algorithm is an object with three hooks (ClientAlgorithm), built by a registered
function whose keyword-only, annotated parameters are its options (as for every registry):

- ``local_terms(global_params, client_states, server_state) -> LocalTerms``: the terms the
  engine adds to the local loss of the round's clients (all of them at once: every tensor
  handed to a term is stacked on a leading client axis, so no algorithm loops over clients,
  and the engine trains them stacked or one by one with the same terms);
- ``client_state_after(...)``: the state a client keeps to its next round (SCAFFOLD's control
  variate, FedDyn's gradient, MOON's previous local model);
- ``server_update(...)``: the server's own state and its correction of the aggregate
  (SCAFFOLD's server control variate, FedDyn's h).

Each algorithm was checked against its authors' code (tests/test_rounds.py works a small case
from it); the defaults are the authors' benchmark settings, as each docstring says.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Callable

import torch
import torch.nn.functional as F
from pydantic import Field

from pipeline.methods.federated.losses import not_true_distillation_stacked
from pipeline.registry import Registry

StateDict = dict[str, torch.Tensor]
# forward(params, inputs) -> (features, logits): params stacked on a leading client axis
# (m, ...), inputs (m, B, ...); BatchNorm in train mode (batch statistics), as the clients train.
Forward = Callable[[StateDict, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
# A parameter-space loss term: (params of the clients ``members``, stacked; members) -> (m,).
Penalty = Callable[[StateDict, list[int]], torch.Tensor]
# An output-space term: (reference forward, inputs, features, logits, targets, members) -> (m,).
# The reference forward carries no gradient and leaves the clients' BatchNorm statistics alone.
OutputTerm = Callable[[Forward, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[int]], torch.Tensor]
# A weight perturbation (FedSoL): (forward, params, inputs, targets, members) -> the perturbation
# of each parameter (stacked like params); the loss is then taken at params + perturbation.
Perturbation = Callable[[Forward, StateDict, torch.Tensor, torch.Tensor, list[int]], StateDict]


@dataclass(frozen=True)
class LocalTerms:
    """What the engine adds to the training of a round's clients (``members`` index them)."""

    penalty: Penalty | None = None
    output_term: OutputTerm | None = None
    perturbation: Perturbation | None = None

    @property
    def empty(self) -> bool:
        return self.penalty is None and self.output_term is None and self.perturbation is None


def _stacked(states: list[StateDict], names) -> StateDict:
    return {n: torch.stack([s[n] for s in states]) for n in names}


def _shared(params: StateDict, m: int) -> StateDict:
    """One state seen by m clients: expanded (no copy) on a leading axis."""
    return {n: t.unsqueeze(0).expand(m, *t.shape) for n, t in params.items()}


def _rows(members: list[int], device) -> torch.Tensor:
    return torch.tensor(members, device=device)


def _per_client(client_states: list[StateDict], prefix: str, like: StateDict) -> StateDict:
    """The clients' state tensors ``<prefix>.<name>``, stacked (zeros for a client without)."""
    return _stacked([{n: s.get(f"{prefix}.{n}", torch.zeros_like(t)) for n, t in like.items()}
                     for s in client_states], list(like))


def _inner(vectors: StateDict, params: StateDict) -> torch.Tensor:
    """(m,): each client's <v, w> over all parameters; v carries no gradient."""
    return sum((vectors[n].detach() * p).flatten(1).sum(1) for n, p in params.items())


class ClientAlgorithm:
    """FedAvg's client (McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks
    from Decentralized Data"): plain local training from the global model, no state. The base
    every algorithm refines."""

    requires_averaging = False  # True: the server's update assumes the aggregate is an average

    def local_terms(self, global_params: StateDict, client_states: list[StateDict], server_state: StateDict) -> LocalTerms:
        return LocalTerms()

    def client_state_after(self, state: StateDict, global_params: StateDict, trained: StateDict, steps: int,
                           lr: float, momentum: float, server_state: StateDict) -> StateDict:
        return state

    def server_update(self, aggregated: StateDict, global_params: StateDict, trained: list[StateDict],
                      old_states: list[StateDict], new_states: list[StateDict], num_clients: int,
                      server_state: StateDict) -> tuple[StateDict, StateDict]:
        """(learned parameters of the aggregate, corrected; the server's new state)."""
        return aggregated, server_state


CLIENT_ALGORITHMS: Registry[Callable[..., ClientAlgorithm]] = Registry("client algorithm")


@CLIENT_ALGORITHMS.register("fedavg")
def fedavg() -> ClientAlgorithm:
    return ClientAlgorithm()


class FedProx(ClientAlgorithm):
    def __init__(self, mu: float):
        self.mu = mu

    def local_terms(self, global_params, client_states, server_state):
        def penalty(params: StateDict, members: list[int]) -> torch.Tensor:
            total = 0
            for name, p in params.items():
                total = total + (p - global_params[name].unsqueeze(0)).pow(2).flatten(1).sum(1)
            return 0.5 * self.mu * total

        return LocalTerms(penalty=penalty)


@CLIENT_ALGORITHMS.register("fedprox")
def fedprox(*, mu: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.01) -> ClientAlgorithm:
    """FedProx: Li et al. 2020, "Federated Optimization in Heterogeneous Networks". The local
    objective adds mu/2 * ||w - w_global||^2 over every trainable parameter (as the FedNTD
    authors' FedProx client computes it). The paper tunes mu over {0.001, 0.01, 0.1, 1}; the
    FedNTD authors' benchmark config uses mu = 1.0."""
    return FedProx(mu)


class Scaffold(ClientAlgorithm):
    requires_averaging = True

    def __init__(self, adaptive_division: bool):
        self.adaptive_division = adaptive_division

    def local_terms(self, global_params, client_states, server_state):
        c = {n: server_state.get(f"c.{n}", torch.zeros_like(g)) for n, g in global_params.items()}
        correction = {n: c[n].unsqueeze(0) - c_i for n, c_i in _per_client(client_states, "c", global_params).items()}

        def penalty(params: StateDict, members: list[int]) -> torch.Tensor:
            # <c - c_i, w>: its gradient, c - c_i, is the correction SCAFFOLD adds to each step's
            # gradient before the optimiser (weight decay and momentum) sees it.
            rows = _rows(members, next(iter(params.values())).device)
            return _inner({n: v[rows] for n, v in correction.items()}, params)

        return LocalTerms(penalty=penalty)

    def divisor(self, steps: int, lr: float, momentum: float) -> float:
        """1 / (K lr) of the paper's option II; with momentum rho, the authors' adaptive division
        counts the effective number of steps (K - rho (1 - rho^K) / (1 - rho)) / (1 - rho)."""
        k = float(steps)
        if self.adaptive_division and momentum > 0:
            k = (k - momentum * (1.0 - momentum ** steps) / (1.0 - momentum)) / (1.0 - momentum)
        return 1.0 / (k * lr)

    def client_state_after(self, state, global_params, trained, steps, lr, momentum, server_state):
        d = self.divisor(steps, lr, momentum)
        out = {}
        for n, g in global_params.items():
            c_i = state.get(f"c.{n}", torch.zeros_like(g))
            c = server_state.get(f"c.{n}", torch.zeros_like(g))
            out[f"c.{n}"] = c_i - c + d * (g - trained[n])
        return out

    def server_update(self, aggregated, global_params, trained, old_states, new_states, num_clients, server_state):
        # c <- c + (|S| / N) * mean over the round's clients of (c_i+ - c_i)
        new = {}
        for n, g in global_params.items():
            key = f"c.{n}"
            delta = torch.stack([new_s[key] - old_s.get(key, torch.zeros_like(g))
                                 for old_s, new_s in zip(old_states, new_states)]).mean(0)
            new[key] = server_state.get(key, torch.zeros_like(g)) + len(trained) / num_clients * delta
        return aggregated, new


@CLIENT_ALGORITHMS.register("scaffold")
def scaffold(*, adaptive_division: bool = True) -> ClientAlgorithm:
    """SCAFFOLD: Karimireddy et al. 2020, "SCAFFOLD: Stochastic Controlled Averaging for
    Federated Learning", control variates updated by the paper's option II. Each step's
    gradient gets c - c_i; after training c_i+ = c_i - c + (w_global - w_i) / (K lr); the server
    adds |S|/N times the mean change of the round's c_i to c. ``adaptive_division`` (the FedNTD
    and FedSoL authors' default) corrects K for momentum. Needs an averaging aggregator."""
    return Scaffold(adaptive_division)


class FedDyn(ClientAlgorithm):
    requires_averaging = True

    def __init__(self, alpha: float):
        self.alpha = alpha

    def local_terms(self, global_params, client_states, server_state):
        grads = _per_client(client_states, "grad", global_params)
        proximal = FedProx(self.alpha).local_terms(global_params, client_states, server_state).penalty

        def penalty(params: StateDict, members: list[int]) -> torch.Tensor:
            # - <grad_i, w> + alpha/2 ||w - w_global||^2 (FedProx's term with mu = alpha)
            rows = _rows(members, next(iter(params.values())).device)
            return -_inner({n: v[rows] for n, v in grads.items()}, params) + proximal(params, members)

        return LocalTerms(penalty=penalty)

    def client_state_after(self, state, global_params, trained, steps, lr, momentum, server_state):
        return {f"grad.{n}": state.get(f"grad.{n}", torch.zeros_like(g)) - self.alpha * (trained[n] - g)
                for n, g in global_params.items()}

    def server_update(self, aggregated, global_params, trained, old_states, new_states, num_clients, server_state):
        # h <- h - alpha/N * sum over the round's clients of (w_i - w_global); w = average - h / alpha
        h = {}
        out = dict(aggregated)
        for n, g in global_params.items():
            moved = torch.stack([t[n] - g for t in trained]).sum(0)
            h[f"h.{n}"] = server_state.get(f"h.{n}", torch.zeros_like(g)) - self.alpha / num_clients * moved
            out[n] = aggregated[n] - h[f"h.{n}"] / self.alpha
        return out, h


@CLIENT_ALGORITHMS.register("feddyn")
def feddyn(*, alpha: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 0.1) -> ClientAlgorithm:
    """FedDyn: Acar et al. 2021, "Federated Learning Based on Dynamic Regularization". The
    local loss subtracts <grad_i, w> and adds alpha/2 ||w - w_global||^2; after training
    grad_i <- grad_i - alpha (w_i - w_global); the server keeps h <- h - alpha/N sum(w_i -
    w_global) and sets the global model to the average minus h / alpha, as the FedNTD authors'
    FedDyn does (on the learned parameters; their code also moves BatchNorm statistics by h).
    alpha = 0.1: the FedSoL authors' benchmark config. Needs an averaging aggregator."""
    return FedDyn(alpha)


class FedNTD(ClientAlgorithm):
    def __init__(self, tau: float, beta: float):
        self.tau, self.beta = tau, beta

    def local_terms(self, global_params, client_states, server_state):
        def term(reference: Forward, inputs, features, logits, targets, members):
            _, global_logits = reference(_shared(global_params, len(members)), inputs)
            return self.beta * not_true_distillation_stacked(logits, global_logits, targets[:, :, 0], self.tau)

        return LocalTerms(output_term=term)


@CLIENT_ALGORITHMS.register("fedntd")
def fedntd(*, tau: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 1.0,
           beta: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 1.0) -> ClientAlgorithm:
    """FedNTD: Lee et al. 2022, "Preservation of the Global Knowledge by Not-True Distillation
    in Federated Learning". CE + beta * KL between the global and the local model's softmax at
    temperature tau over the classes that are not the true one
    (pipeline.methods.federated.losses). tau = 1, beta = 1: the authors' benchmark config."""
    return FedNTD(tau, beta)


class Moon(ClientAlgorithm):
    def __init__(self, mu: float, tau: float):
        self.mu, self.tau = mu, tau

    def local_terms(self, global_params, client_states, server_state):
        names = list(global_params)
        previous = _stacked([{n: s.get(f"prev.{n}", global_params[n]) for n in names} for s in client_states], names)

        def term(reference: Forward, inputs, features, logits, targets, members):
            rows = _rows(members, inputs.device)
            z_global, _ = reference(_shared(global_params, len(members)), inputs)
            z_prev, _ = reference({n: t[rows] for n, t in previous.items()}, inputs)
            positive = F.cosine_similarity(features, z_global, dim=-1)
            negative = F.cosine_similarity(features, z_prev, dim=-1)
            # -log(e^{pos/tau} / (e^{pos/tau} + e^{neg/tau})): CE with the positive as class 0
            pair = torch.stack([positive, negative], -1) / self.tau
            return self.mu * -(pair.log_softmax(-1)[..., 0]).mean(-1)

        return LocalTerms(output_term=term)

    def client_state_after(self, state, global_params, trained, steps, lr, momentum, server_state):
        return {f"prev.{n}": trained[n].clone() for n in global_params}


@CLIENT_ALGORITHMS.register("moon")
def moon(*, mu: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.1,
         tau: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 1.0) -> ClientAlgorithm:
    """MOON: Li, He & Song 2021, "Model-Contrastive Federated Learning". CE + mu * the
    contrastive loss that pulls the local representation towards the global model's and away
    from the client's previous local model's (cosine similarity over temperature tau), on the
    backbone's features as the FedNTD authors' MOON takes them (no projection head). A client
    never trained before uses the global model as its previous one. mu = 0.1, tau = 1: the
    FedSoL authors' benchmark config (the paper uses mu = 5, tau = 0.5 on CIFAR-10)."""
    return Moon(mu, tau)


class FedSoL(ClientAlgorithm):
    def __init__(self, rho: float, tau: float, adaptive: bool):
        self.rho, self.tau, self.adaptive = rho, tau, adaptive

    def local_terms(self, global_params, client_states, server_state):
        def perturbation(forward: Forward, params: StateDict, inputs, targets, members) -> StateDict:
            m = len(members)
            with torch.no_grad():
                _, global_logits = forward(_shared(global_params, m), inputs)
            _, logits = forward(params, inputs)
            target = (global_logits / self.tau).softmax(-1)
            kl = (target * (target.clamp_min(1e-30).log() - (logits / self.tau).log_softmax(-1))).sum(-1).mean(-1)
            grads = torch.autograd.grad(kl.sum(), list(params.values()))
            norm = torch.sqrt(sum(g.pow(2).flatten(1).sum(1) for g in grads))  # per client
            # A client still at the global weights (its first step) has KL = 0 and gradient 0:
            # exactly 0, not float noise normalised to length rho (the authors' code gets the
            # exact 0 from two bitwise-equal forward passes).
            at_global = torch.stack([(p.detach() == global_params[n].unsqueeze(0)).flatten(1).all(1)
                                     for n, p in params.items()]).all(0)
            scale = torch.where(at_global, 0.0, self.rho / (norm + 1e-12))
            out = {}
            for (n, p), g in zip(params.items(), grads):
                e = g * scale.view(-1, *([1] * (g.ndim - 1)))
                if self.adaptive:  # the authors' ExpSAM: |w - w_global| normalised along dim 0
                    moved = (p.detach() - global_params[n].unsqueeze(0)).abs()
                    e = e * F.normalize(moved, p=2, dim=1)  # dim 1 = each client's dim 0
                out[n] = e.detach()
            return out

        return LocalTerms(perturbation=perturbation)


@CLIENT_ALGORITHMS.register("fedsol")
def fedsol(*, rho: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 1.0,
           tau: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 3.0,
           adaptive: bool = True) -> ClientAlgorithm:
    """FedSoL: Lee et al. 2024, "FedSoL: Stabilized Orthogonal Learning with Proximal
    Restrictions in Federated Learning" (CVPR). Each step: the gradient of the proximal loss,
    KL(global || local) of the softmax at temperature tau (the authors fix tau = 3), gives the
    direction of a weight perturbation of size rho (SAM's rho * g / ||g||, per client); the
    local loss's gradient is taken at the perturbed weights and applied to the unperturbed
    ones. ``adaptive`` weighs the perturbation elementwise by |w - w_global| normalised along
    each tensor's first dimension, as the authors' fedsol_adaptive; the fixed variant is plain
    SAM on the proximal gradient. BatchNorm statistics move only in the first pass, as theirs.
    rho = 1.0: the authors' config."""
    return FedSoL(rho, tau, adaptive)
