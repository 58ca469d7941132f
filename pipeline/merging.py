"""Merge K experts into one state dict without training. Pure tensor code.

A merger: ``(experts, base, weights, **options) -> state_dict`` where ``experts`` are K
state dicts of one architecture, ``base`` the pretrained state dict they were fine-tuned
from, ``weights`` the experts' data-size weights (sum 1). Options are keyword-only and
annotated; config validation builds its checks from these signatures. A merger that needs
data (Fisher, RegMean, greedy soup) also takes ``data``: a pipeline.merge_data.MergeData.

Merges go tensor by tensor: only the K copies of one tensor are stacked at a time, never
whole models. Integer buffers (BatchNorm's num_batches_tracked) are taken from expert 0;
float buffers (BatchNorm running statistics) are averaged and should be recomputed after
merging (see pipeline.batchnorm).
"""
from __future__ import annotations

from typing import Annotated, Callable

import torch
from pydantic import Field, PositiveInt

from pipeline.drop_masks import DropMasks
from pipeline.registry import Registry

StateDict = dict[str, torch.Tensor]
MERGERS: Registry[Callable[..., StateDict]] = Registry("merger")

Fraction = Annotated[float, Field(gt=0, le=1)]
Scale = Annotated[float, Field(gt=0)]


def _each_tensor(experts: list[StateDict], merge_one: Callable[[str, torch.Tensor], torch.Tensor]) -> StateDict:
    """The loop every merger shares: ``merge_one(key, expert 0's tensor)`` gives the merged
    float tensor, cast back to the experts' dtype; integer buffers (BatchNorm's
    num_batches_tracked) are taken from expert 0."""
    _check_same_keys(experts)
    return {key: merge_one(key, first).to(first.dtype) if first.is_floating_point() else first.clone()
            for key, first in experts[0].items()}


def _per_tensor(experts: list[StateDict], combine: Callable[[str, torch.Tensor], torch.Tensor],
                base: StateDict | None = None) -> StateDict:
    """Apply ``combine(key, (K, *shape) stack)`` one tensor at a time (for merges that need
    all K values of a parameter at once, like TIES's sign election). With ``base``, the stack
    of a learned tensor holds the task vectors ``expert - base`` instead of the experts.

    Every stack lives in one buffer, reused from tensor to tensor: a fresh stack of a large
    tensor (over glibc's 32 MiB mmap ceiling, see pipeline.allocator) would fault in every
    page again. ``combine`` may work in the stack in place; what it returns is copied out of
    the buffer if it is a view into it."""
    k = len(experts)
    largest = max((t.numel() for t in experts[0].values()), default=0) if experts else 0
    buffers: dict[torch.device, torch.Tensor] = {}

    def merge_one(key: str, first: torch.Tensor) -> torch.Tensor:
        buffer = buffers.setdefault(first.device, torch.empty(k * largest, device=first.device))
        stacked = buffer[: k * first.numel()].view(k, *first.shape)
        theta0 = base[key].float() if base is not None and not _is_running_stat(key) else None
        for row, e in zip(stacked, experts):
            if theta0 is None:
                row.copy_(e[key])
            else:
                torch.sub(e[key], theta0, out=row)  # the task vector in one pass
        merged = combine(key, stacked)
        return merged.clone() if merged.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr() else merged

    return _each_tensor(experts, merge_one)


def _weighted_sum(experts: list[StateDict], weights: list[float]) -> StateDict:
    """sum_k w_k * expert_k, accumulated in place tensor by tensor: each expert tensor is
    read once and nothing of size K x tensor is ever built (memory-bound, no stacking)."""

    def merge_one(key: str, first: torch.Tensor) -> torch.Tensor:
        acc = first.float() * weights[0]
        for e, w in zip(experts[1:], weights[1:]):
            acc.add_(e[key], alpha=w)
        return acc

    return _each_tensor(experts, merge_one)


def _check_same_keys(experts: list[StateDict]) -> None:
    if not experts:
        raise ValueError("nothing to merge: no experts given")
    keys = list(experts[0])
    for i, e in enumerate(experts[1:], 1):
        if list(e) != keys:
            raise ValueError(f"expert {i} has different tensors than expert 0")


def _is_running_stat(key: str) -> bool:
    return key.endswith("running_mean") or key.endswith("running_var")


@MERGERS.register("uniform")
def uniform(experts: list[StateDict], base: StateDict | None, weights: torch.Tensor) -> StateDict:
    """Uniform weight averaging (model soup / 'uniform soup', Wortsman et al. 2022)."""
    return _weighted_sum(experts, [1.0 / len(experts)] * len(experts))


@MERGERS.register("fedavg")
def fedavg(experts: list[StateDict], base: StateDict | None, weights: torch.Tensor) -> StateDict:
    """FedAvg's aggregation: average weighted by each client's number of samples
    (McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from Decentralized Data")."""
    return _weighted_sum(experts, [float(w) for w in weights])


def _task_vector_merge(
    experts: list[StateDict], base: StateDict | None, combine_deltas: Callable[[str, torch.Tensor], torch.Tensor]
) -> StateDict:
    """base + combine_deltas(name, (K, *shape) task vectors), tensor by tensor."""
    if base is None:
        raise ValueError("this merger needs the pretrained base model")

    def combine(key: str, stacked: torch.Tensor) -> torch.Tensor:
        if _is_running_stat(key):  # statistics, not learned weights: no task vector
            return stacked.mean(0)
        return base[key].float() + combine_deltas(key, stacked)

    return _per_tensor(experts, combine, base)


@MERGERS.register("task_arithmetic")
def task_arithmetic(
    experts: list[StateDict], base: StateDict | None, weights: torch.Tensor, *, scale: Scale = 0.5
) -> StateDict:
    """Task arithmetic: theta_0 + scale * sum_k (theta_k - theta_0) (Ilharco et al. 2023,
    "Editing Models with Task Arithmetic"). scale = 1/K gives the uniform average."""
    return _task_vector_merge(experts, base, lambda _, deltas: scale * deltas.sum(0))


# Columns per block in the blockwise combines: K rows of 2**16 floats (2 MiB at K=8) keep each
# block's temporaries in cache instead of allocating fresh K x tensor arrays (page faults).
_BLOCK = 1 << 16


def top_magnitude_thresholds(rows: torch.Tensor, keep: int, sample: int = 4096) -> torch.Tensor:
    """Per row of (K, n): the ``keep``-th largest magnitude, exactly what
    ``rows.abs().topk(keep, dim=1).values.amin(1)`` gives, as a (K, 1) column.

    Why not topk alone: on a large tensor it dominates a TIES merge. Instead a fixed random
    sample of each row brackets the answer (Floyd & Rivest's select), one blockwise pass counts
    the entries above the bracket and gathers the few inside it, and topk runs on those only.
    A row whose bracket misses (improbable, ~4 standard deviations) falls back to topk."""
    k, n = rows.shape
    if n <= 16 * sample:
        return rows.abs().topk(keep, dim=1, sorted=False).values.amin(1, keepdim=True)
    g = torch.Generator(device=rows.device).manual_seed(0)
    picked = rows[:, torch.randint(0, n, (sample,), generator=g, device=rows.device)].abs()
    picked = picked.sort(dim=1, descending=True).values
    share = keep / n
    rank, slack = share * sample, 4 * (sample * share * (1 - share)) ** 0.5 + 2
    hi = picked[:, max(0, int(rank - slack))].unsqueeze(1)
    lo = picked[:, min(sample - 1, int(rank + slack))].unsqueeze(1)
    above = torch.zeros(k, dtype=torch.long, device=rows.device)
    inside, counts = [], []
    for start in range(0, n, _BLOCK):
        magnitude = rows[:, start:start + _BLOCK].abs()
        above += (magnitude > hi).sum(1)
        between = (magnitude >= lo) & (magnitude <= hi)
        # A boolean gather keeps row-major order: row i's values are the i-th run of the result,
        # as long as row i's count. Cheaper than nonzero's (row, column) pairs, the costly part
        # of this pass.
        inside.append(magnitude[between])
        counts.append(between.sum(1))
    runs = torch.cat(inside).split(torch.stack(counts).view(-1).tolist())  # block-major, row-minor
    out = torch.empty(k, 1, dtype=rows.dtype, device=rows.device)
    for i, n_above in enumerate(above.tolist()):
        need, candidates = keep - n_above, torch.cat(runs[i::k])
        if 0 < need <= candidates.numel():
            out[i] = candidates.topk(need, sorted=False).values.amin()
        else:  # the bracket missed: select on the whole row
            out[i] = rows[i].abs().topk(keep, sorted=False).values.amin()
    return out


def ties_combine(deltas: torch.Tensor, density: float) -> torch.Tensor:
    """TIES on one tensor's K task vectors (K, *shape): trim, elect sign, disjoint mean.
    Column block by column block, so no temporary of the stack's size is built."""
    k = deltas.shape[0]
    flat = deltas.reshape(k, -1)
    n = flat.shape[1]
    keep = max(1, int(round(density * n)))
    # Trim: keep each task vector's top-`density` entries by magnitude, zero the rest.
    threshold = top_magnitude_thresholds(flat, keep) if keep < n else None
    merged = torch.empty(n, dtype=flat.dtype, device=flat.device)
    for start in range(0, n, _BLOCK):
        block = flat[:, start:start + _BLOCK]
        trimmed = block * (block.abs() >= threshold) if threshold is not None else block.clone()
        # Elect: the sign with the larger total magnitude per parameter.
        sign = trimmed.sum(0).sign_()
        # Disjoint mean: average only the (non-zero) entries that agree with the elected sign.
        # Times the sign, those are the positive entries: their sum (times the sign again) and
        # count give the mean, bit for bit what summing the agreeing entries gives, in fewer passes.
        signed = trimmed.mul_(sign)
        count = (signed > 0).sum(0).clamp_(min=1)
        torch.div(signed.clamp_(min=0).sum(0).mul_(sign), count, out=merged[start:start + _BLOCK])
    return merged.reshape(deltas.shape[1:])


@MERGERS.register("ties")
def ties(
    experts: list[StateDict],
    base: StateDict | None,
    weights: torch.Tensor,
    *,
    density: Fraction = 0.2,
    scale: Scale = 1.0,
) -> StateDict:
    """TIES-merging: Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging
    Models". Trim to the top-``density`` magnitudes, elect a sign per parameter, average the
    agreeing entries, add ``scale`` times the result to the base. Trimming is per tensor
    (as mergekit does), not over the whole flattened model as in the paper."""
    return _task_vector_merge(experts, base, lambda _, deltas: scale * ties_combine(deltas, density))


def dare_drop(deltas: torch.Tensor, density: float, seed: int, key: str,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """DARE on (K, *shape) task vectors: keep each entry with probability q (``density`` to
    16 bits, see pipeline.drop_masks), rescale the kept ones by 1/q so the expected task
    vector is unchanged. Row k's mask is the k-th drawn for (seed, key), as in ``dare``.
    ``out=deltas`` drops in place."""
    masks = DropMasks(seed, key, deltas[0].numel(), density)
    out = torch.empty_like(deltas) if out is None else out
    for row, delta in enumerate(deltas):
        keep = masks.next().view(delta.shape).to(delta.device, non_blocking=True)
        torch.mul(delta, keep, out=out[row]).div_(masks.q)
    return out


@MERGERS.register("dare")
def dare(
    experts: list[StateDict],
    base: StateDict | None,
    weights: torch.Tensor,
    *,
    density: Fraction = 0.5,
    scale: Scale = 0.5,
    seed: int = 0,
) -> StateDict:
    """DARE (drop and rescale) then task arithmetic: Yu et al. 2024, "Language Models are
    Super Mario: Absorbing Abilities from Homologous Models as a Free Lunch". Each task-vector
    entry is dropped with probability 1 - density and the survivors are scaled by 1/density
    (density to 16 bits: see pipeline.drop_masks).

    Expert by expert into one accumulator, like the averages: no K-stack is built."""
    if base is None:
        raise ValueError("this merger needs the pretrained base model")

    def merge_one(key: str, first: torch.Tensor) -> torch.Tensor:
        if _is_running_stat(key):  # statistics, not learned weights: no task vector
            return sum(e[key].float() for e in experts) / len(experts)
        theta0 = base[key].float()
        masks = DropMasks(seed, key, theta0.numel(), density)
        kept_sum, delta = torch.zeros_like(theta0), torch.empty_like(theta0)
        for e in experts:
            keep = masks.next().view(theta0.shape).to(theta0.device, non_blocking=True)
            # sub, mul_, add_: measured faster than addcmul_, which copies its operands.
            kept_sum.add_(torch.sub(e[key], theta0, out=delta).mul_(keep))
        return kept_sum.mul_(scale / masks.q).add_(theta0)

    return _each_tensor(experts, merge_one)


@MERGERS.register("dare_ties")
def dare_ties(
    experts: list[StateDict],
    base: StateDict | None,
    weights: torch.Tensor,
    *,
    density: Fraction = 0.5,
    scale: Scale = 1.0,
    seed: int = 0,
) -> StateDict:
    """DARE-TIES: DARE's random drop-and-rescale in place of TIES's magnitude trim, then TIES's
    sign election and disjoint mean (Yu et al. 2024, with Yadav et al. 2023)."""

    def combine(key: str, d: torch.Tensor) -> torch.Tensor:
        dropped = dare_drop(d, density, seed, key, out=d)  # the stack is ours
        return scale * ties_combine(dropped, density=1.0)  # nothing left to trim

    return _task_vector_merge(experts, base, combine)


def breadcrumbs_mask(deltas: torch.Tensor, density: float, outliers: float) -> torch.Tensor:
    """Per task vector (row of (K, n)): drop the top ``outliers`` fraction by magnitude and
    keep the next ``density`` fraction; everything smaller is dropped too.

    Cut at two magnitude thresholds (the exact select TIES uses), not by sorting each row:
    measured 4.9-5.4 s -> 0.62-0.78 s for K=8 ResNet-18. Entries tied in magnitude at a cut
    are all kept or all dropped, where a sort would split them by position."""
    k = deltas.shape[0]
    flat = deltas.reshape(k, -1)
    n = flat.shape[1]
    top, keep = int(round(outliers * n)), max(1, int(round(density * n)))
    magnitude = flat.abs()
    mask = magnitude >= top_magnitude_thresholds(flat, min(n, top + keep))
    if top > 0:
        mask &= magnitude < top_magnitude_thresholds(flat, top)
    return mask.reshape(deltas.shape)


@MERGERS.register("breadcrumbs")
def breadcrumbs(
    experts: list[StateDict],
    base: StateDict | None,
    weights: torch.Tensor,
    *,
    density: Fraction = 0.9,
    outliers: Annotated[float, Field(ge=0, lt=1)] = 0.01,
    scale: Scale = 0.5,
) -> StateDict:
    """Model Breadcrumbs: Davari & Belilovsky 2023, "Model Breadcrumbs: Scaling Multi-Task
    Model Merging with Sparse Masks". Each task vector, per tensor, loses its largest-magnitude
    ``outliers`` fraction and everything below the next ``density`` fraction; the masked task
    vectors are added to the base with ``scale``."""
    return _task_vector_merge(
        experts, base, lambda _, d: scale * (d * breadcrumbs_mask(d, density, outliers)).sum(0))


@MERGERS.register("model_stock")
def model_stock(experts: list[StateDict], base: StateDict | None, weights: torch.Tensor) -> StateDict:
    """Model Stock: Jang, Yun & Han 2024, "Model Stock: All we need is just a few fine-tuned
    models". Per tensor, with cos = the mean pairwise cosine between the K task vectors,
    t = K cos / (1 + (K - 1) cos), and the merge is t * mean(experts) + (1 - t) * base."""
    k = len(experts)
    if k < 2:
        raise ValueError("model_stock needs at least 2 experts")

    def combine(_: str, deltas: torch.Tensor) -> torch.Tensor:
        flat = torch.nn.functional.normalize(deltas.reshape(k, -1), dim=1)
        gram = flat @ flat.T
        cos = ((gram.sum() - gram.diagonal().sum()) / (k * (k - 1))).clamp(min=0.0)
        t = k * cos / (1 + (k - 1) * cos)
        return t * deltas.mean(0)  # base + t * (mean - base)

    return _task_vector_merge(experts, base, combine)


@MERGERS.register("slerp")
def slerp(
    experts: list[StateDict], base: StateDict | None, weights: torch.Tensor, *, t: Fraction = 0.5
) -> StateDict:
    """Spherical linear interpolation of two models, per tensor (Shoemake 1985, as used for
    model merging by mergekit): t = 0 gives the first expert, t = 1 the second. Falls back to
    linear interpolation when the two tensors are (anti)parallel or zero."""
    if len(experts) != 2:
        raise ValueError(f"slerp merges exactly 2 experts, got {len(experts)}")

    def combine(key: str, stacked: torch.Tensor) -> torch.Tensor:
        a, b = stacked[0], stacked[1]
        if _is_running_stat(key):
            return (1 - t) * a + t * b
        na, nb = a.norm(), b.norm()
        if na == 0 or nb == 0:
            return (1 - t) * a + t * b
        cos = ((a.flatten() @ b.flatten()) / (na * nb)).clamp(-1.0, 1.0)
        omega = torch.arccos(cos)
        if omega.abs() < 1e-4 or (torch.pi - omega).abs() < 1e-4:
            return (1 - t) * a + t * b
        return (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)

    return _per_tensor(experts, combine)


def _needs(data, name: str):
    if data is None:
        raise ValueError(f"{name} needs data (the experts' shards and the validation split)")
    return data


@MERGERS.register("fisher")
def fisher(
    experts: list[StateDict], base: StateDict | None, weights: torch.Tensor, data=None, *,
    samples: PositiveInt = 256, floor: Annotated[float, Field(gt=0)] = 1e-8,
) -> StateDict:
    """Fisher-weighted averaging: Matena & Raffel 2022, "Merging Models with Fisher-Weighted
    Averaging". theta = sum_k (F_k + floor) theta_k / sum_k (F_k + floor), F_k the diagonal
    Fisher of expert k on up to ``samples`` images of its own shard; where no expert has
    Fisher mass the floor makes it the plain average. Buffers are averaged."""
    data = _needs(data, "fisher")
    fishers = [data.fisher(k, e, samples) for k, e in enumerate(experts)]

    def combine(key: str, stacked: torch.Tensor) -> torch.Tensor:
        if key not in fishers[0]:
            return stacked.mean(0)
        f = torch.stack([fk[key].float() for fk in fishers]) + floor
        return (f * stacked).sum(0) / f.sum(0)

    return _per_tensor(experts, combine)


@MERGERS.register("regmean")
def regmean(
    experts: list[StateDict], base: StateDict | None, weights: torch.Tensor, data=None, *,
    alpha: Fraction = 0.9,
) -> StateDict:
    """RegMean: Jin et al. 2023, "Dataless Knowledge Fusion by Merging Weights of Language
    Models". Each linear (and conv, on unfolded patches) weight solves the regression that
    matches every expert's outputs on its own inputs: W = (sum_k G_k)^-1 sum_k G_k W_k^T with
    G_k = X_k^T X_k, off-diagonals scaled by ``alpha``. Other tensors (biases, BatchNorm) are
    averaged. A ridge of 1e-6 x the mean diagonal, pulling towards the plain average, keeps
    the solve defined when an input dimension is always zero (e.g. a dead ReLU channel):
    W = (G + rI)^-1 (sum_k G_k W_k^T + r W_avg^T)."""
    from pipeline.merge_data import weight_layers

    data = _needs(data, "regmean")
    grams = [data.grams(k, e) for k, e in enumerate(experts)]
    solved = {f"{n}.weight": n for n in weight_layers(data.model)}

    def combine(key: str, stacked: torch.Tensor) -> torch.Tensor:
        if key not in solved:
            return stacked.mean(0)
        k, out = stacked.shape[0], stacked.shape[1]
        w = stacked.reshape(k, out, -1)  # (K, out, D)
        w = w.double()  # the normal equations are ill-conditioned in float32
        g = torch.stack([gk[solved[key]].double() for gk in grams])  # (K, D, D)
        diag = torch.diag_embed(g.diagonal(dim1=1, dim2=2))
        g = alpha * g + (1 - alpha) * diag
        total = g.sum(0)
        ridge = 1e-6 * total.diagonal().mean().clamp(min=1e-12)
        total = total + ridge * torch.eye(total.shape[0], device=total.device, dtype=total.dtype)
        rhs = (g @ w.transpose(1, 2)).sum(0) + ridge * w.mean(0).T  # (D, out)
        return torch.linalg.solve(total, rhs).T.reshape(stacked.shape[1:]).to(stacked.dtype)

    return _per_tensor(experts, combine)


@MERGERS.register("greedy_soup")
def greedy_soup(experts: list[StateDict], base: StateDict | None, weights: torch.Tensor, data=None) -> StateDict:
    """Greedy soup: Wortsman et al. 2022, "Model soups: averaging weights of multiple
    fine-tuned models improves accuracy without increasing inference time". Experts sorted by
    validation accuracy; each is added to the uniform soup only if the soup's validation
    accuracy does not drop. The chosen experts are left in ``data.notes['greedy_soup']``."""
    data = _needs(data, "greedy_soup")
    scores = [data.val_accuracy(e) for e in experts]
    order = sorted(range(len(experts)), key=lambda i: -scores[i])
    chosen, best = [order[0]], scores[order[0]]
    for i in order[1:]:
        acc = data.val_accuracy(uniform([experts[j] for j in chosen + [i]], base, weights))
        if acc >= best:
            chosen, best = chosen + [i], acc
    data.notes["greedy_soup"] = {"experts": sorted(chosen), "val_accuracy": best}
    return uniform([experts[j] for j in chosen], base, weights)


def pcb_combine(deltas: torch.Tensor, density: float) -> torch.Tensor:
    """PCB on one tensor's K task vectors (K, *shape): balance, drop, rescale, weighted mean.

    Column block by column block, as ties_combine: only the balance scores are kept whole
    (each task's threshold is over its whole row): measured 1.9-2.1 s -> 0.63-0.66 s on K=8
    ResNet-18 (`python -m bench.merge_ab`), where each whole-tensor temporary faulted its pages
    in afresh."""
    k = deltas.shape[0]
    flat = deltas.reshape(k, -1).float()
    n = flat.shape[1]
    # Intra-balancing rescales delta^2 to [0, 1] per task: from each row's least and greatest |delta|.
    lo = torch.full((k, 1), float("inf"), device=flat.device)
    hi = torch.zeros(k, 1, device=flat.device)
    for start in range(0, n, _BLOCK):
        low, high = flat[:, start:start + _BLOCK].abs().aminmax(dim=1, keepdim=True)
        lo, hi = torch.minimum(lo, low), torch.maximum(hi, high)
    lo, span = lo**2, (hi**2 - lo**2).clamp(min=1e-12)
    balance = torch.empty_like(flat)
    for start in range(0, n, _BLOCK):
        block = flat[:, start:start + _BLOCK]
        intra = torch.exp(k * ((block**2 - lo) / span))  # softmax over a task's entries, up to a constant
        inter = torch.softmax(block * block.sum(0, keepdim=True), dim=0)  # across tasks, per entry
        torch.mul(intra, inter, out=balance[:, start:start + _BLOCK])
    keep = max(1, int(round(density * n)))
    threshold = top_magnitude_thresholds(balance, keep)  # balance > 0: its k-th largest value
    scale = (balance.amax(1, keepdim=True) - threshold).clamp(min=1e-12)
    merged = torch.empty(n, device=flat.device)
    for start in range(0, n, _BLOCK):
        b = balance[:, start:start + _BLOCK]
        score = ((b - threshold) / scale).clamp_(min=1e-12).mul_(b >= threshold)
        weighted = (score * flat[:, start:start + _BLOCK]).sum(0)
        torch.div(weighted, score.sum(0).clamp_(min=1e-12), out=merged[start:start + _BLOCK])
    return merged.reshape(deltas.shape[1:])


@MERGERS.register("pcb")
def pcb(
    experts: list[StateDict], base: StateDict | None, weights: torch.Tensor, *,
    density: Fraction = 0.2, scale: Scale = 1.0,
) -> StateDict:
    """PCB-merging: Du et al. 2024, "Parameter Competition Balancing for Model Merging" (NeurIPS).
    Per entry, intra-balancing exp(K * minmax(delta_k^2)) times inter-balancing softmax over
    tasks of delta_k * sum_j delta_j (as the authors' release computes it); each task keeps
    its top-``density`` scores, rescaled to (0, 1]; the merge is the score-weighted mean of
    the task vectors, added to the base with ``scale``. Per tensor, like TIES here (the paper
    flattens whole models); the paper's outlier clamp is not applied."""
    return _task_vector_merge(experts, base, lambda _, d: scale * pcb_combine(d, density))
