"""Permutation alignment by weight matching: Ainsworth, Hayase & Srinivasa 2023, "Git Re-Basin:
Merging Models modulo Permutation Symmetries" (their Algorithm 1).

Hidden units can be reordered without changing a network's function; two independently
trained networks rarely agree on the order, so averaging them mixes unrelated units. Weight
matching permutes each expert's hidden units to maximise sum_l <W_l^ref, P_l W_l P_{l-1}^T>,
solving one linear assignment per permutation in turn until none changes.

A permutation spec names, for each group of hidden units, every (tensor, axis) it permutes.
Experts fine-tuned from one backbone usually align to the identity; alignment matters when
experts start from different initialisations.
"""
from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment

StateDict = dict[str, torch.Tensor]
PermSpec = dict[str, list[tuple[str, int]]]  # group -> [(tensor name, axis)]


def small_cnn_spec(state: StateDict) -> PermSpec:
    """SmallCNN: the channels of each conv-BN block; the next conv (or the classifier) reads them."""
    blocks = [0, 1, 3]
    spec: PermSpec = {}
    for i, b in enumerate(blocks):
        members = [(f"body.{b}.0.weight", 0)]
        members += [(f"body.{b}.1.{t}", 0) for t in ("weight", "bias", "running_mean", "running_var")]
        members.append((f"body.{blocks[i + 1]}.0.weight", 1) if i + 1 < len(blocks) else ("classifier.weight", 1))
        spec[f"block{b}"] = [(k, a) for k, a in members if k in state]
    return spec


SPECS = {"small_cnn": small_cnn_spec}


def permute(state: StateDict, spec: PermSpec, perms: dict[str, torch.Tensor]) -> StateDict:
    """Apply the permutations: tensor[..., perm, ...] along each axis a group names."""
    out = dict(state)
    for group, members in spec.items():
        for key, axis in members:
            out[key] = out[key].index_select(axis, perms[group].to(out[key].device))
    return out


def _permuted_except(state: StateDict, spec: PermSpec, perms: dict[str, torch.Tensor], key: str,
                     skip_axis: int) -> torch.Tensor:
    w = state[key]
    for group, members in spec.items():
        for k, axis in members:
            if k == key and axis != skip_axis:
                w = w.index_select(axis, perms[group].to(w.device))
    return w


def weight_matching(reference: StateDict, other: StateDict, spec: PermSpec, max_iter: int = 100,
                    seed: int = 0) -> dict[str, torch.Tensor]:
    """Permutations that make ``other`` match ``reference`` (apply them with ``permute``)."""
    sizes = {g: reference[m[0][0]].shape[m[0][1]] for g, m in spec.items()}
    perms = {g: torch.arange(n) for g, n in sizes.items()}
    g = torch.Generator().manual_seed(seed)
    for _ in range(max_iter):
        changed = False
        for group in [list(spec)[i] for i in torch.randperm(len(spec), generator=g)]:
            n = sizes[group]
            score = torch.zeros(n, n, dtype=torch.float64)
            for key, axis in spec[group]:
                ref = reference[key].double().movedim(axis, 0).reshape(n, -1).cpu()
                oth = _permuted_except(other, spec, perms, key, axis).double().movedim(axis, 0).reshape(n, -1).cpu()
                score += ref @ oth.T
            rows, cols = linear_sum_assignment(score.numpy(), maximize=True)
            new = torch.as_tensor(cols, dtype=torch.long)
            old_value = score[torch.arange(n), perms[group]].sum()
            new_value = score[torch.as_tensor(rows), new].sum()
            if new_value > old_value + 1e-12:
                perms[group], changed = new, True
        if not changed:
            break
    return perms


def align_experts(arch: str, reference: StateDict, experts: list[StateDict],
                  seed: int = 0) -> tuple[list[StateDict], list[bool]]:
    """Each expert permuted to match ``reference``; also whether each needed a non-identity
    permutation. ``seed`` (base.seed) orders the permutation groups each pass, expert by expert."""
    if arch not in SPECS:
        raise ValueError(f"weight matching has a permutation spec for {', '.join(SPECS)}, not {arch!r}")
    spec = SPECS[arch](reference)
    aligned, moved = [], []
    for e in experts:
        perms = weight_matching(reference, e, spec, seed=seed)
        aligned.append(permute(e, spec, perms))
        moved.append(any(not torch.equal(p, torch.arange(len(p))) for p in perms.values()))
    return aligned, moved
