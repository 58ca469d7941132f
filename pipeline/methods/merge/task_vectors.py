"""Task-vector mergers: base + a combination of the experts' task vectors (expert - base):
task arithmetic, TIES, DARE, DARE-TIES, Model Breadcrumbs, PCB."""
from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field, PositiveInt

from pipeline.methods.merge.base import MERGERS, Fraction, Scale, StateDict, each_tensor, is_running_stat, task_vector_merge
from pipeline.methods.merge.drop_masks import DropMasks
from pipeline.methods.merge.sparsify import BLOCK, breadcrumbs_mask, dare_drop, top_magnitude_thresholds


@MERGERS.register("task_arithmetic")
def task_arithmetic(
    experts: list[StateDict], base: StateDict | None, weights: torch.Tensor, *, scale: Scale = 0.5
) -> StateDict:
    """Task arithmetic: theta_0 + scale * sum_k (theta_k - theta_0) (Ilharco et al. 2023,
    "Editing Models with Task Arithmetic"). scale = 1/K gives the uniform average."""
    return task_vector_merge(experts, base, lambda _, deltas: scale * deltas.sum(0))

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
    for start in range(0, n, BLOCK):
        block = flat[:, start:start + BLOCK]
        trimmed = block * (block.abs() >= threshold) if threshold is not None else block.clone()
        # Elect: the sign with the larger total magnitude per parameter; + where the total is
        # exactly 0, as mergekit elects (its get_mask sets sign 0 to 1).
        sign = torch.where(trimmed.sum(0) >= 0, 1.0, -1.0).to(trimmed.dtype)
        # Disjoint mean: average only the (non-zero) entries that agree with the elected sign.
        # Times the sign, those are the positive entries: their sum (times the sign again) and
        # count give the mean, bit for bit what summing the agreeing entries gives, in fewer passes.
        signed = trimmed.mul_(sign)
        count = (signed > 0).sum(0).clamp_(min=1)
        torch.div(signed.clamp_(min=0).sum(0).mul_(sign), count, out=merged[start:start + BLOCK])
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
    return task_vector_merge(experts, base, lambda _, deltas: scale * ties_combine(deltas, density))


@MERGERS.register("dare")
def dare(
    experts: list[StateDict],
    base: StateDict | None,
    weights: torch.Tensor,
    seed: int = 0,
    *,
    density: Fraction = 0.5,
    scale: Scale = 0.5,
) -> StateDict:
    """DARE (drop and rescale) then task arithmetic: Yu et al. 2024, "Language Models are
    Super Mario: Absorbing Abilities from Homologous Models as a Free Lunch". Each task-vector
    entry is dropped with probability 1 - density and the survivors are scaled by 1/density
    (density to 16 bits: see pipeline.methods.merge.drop_masks).

    Expert by expert into one accumulator, like the averages: no K-stack is built."""
    if base is None:
        raise ValueError("this merger needs the pretrained base model")

    def merge_one(key: str, first: torch.Tensor) -> torch.Tensor:
        if is_running_stat(key):  # statistics, not learned weights: no task vector
            return sum(e[key].float() for e in experts) / len(experts)
        theta0 = base[key].float()
        masks = DropMasks(seed, key, theta0.numel(), density)
        kept_sum, delta = torch.zeros_like(theta0), torch.empty_like(theta0)
        for e in experts:
            keep = masks.next().view(theta0.shape).to(theta0.device, non_blocking=True)
            # sub, mul_, add_: measured faster than addcmul_, which copies its operands.
            kept_sum.add_(torch.sub(e[key], theta0, out=delta).mul_(keep))
        return kept_sum.mul_(scale / masks.q).add_(theta0)

    return each_tensor(experts, merge_one)


@MERGERS.register("dare_ties")
def dare_ties(
    experts: list[StateDict],
    base: StateDict | None,
    weights: torch.Tensor,
    seed: int = 0,
    *,
    density: Fraction = 0.5,
    scale: Scale = 1.0,
) -> StateDict:
    """DARE-TIES: DARE's random drop-and-rescale in place of TIES's magnitude trim, then TIES's
    sign election and disjoint mean (Yu et al. 2024, with Yadav et al. 2023)."""

    def combine(key: str, d: torch.Tensor) -> torch.Tensor:
        dropped = dare_drop(d, density, seed, key, out=d)  # the stack is ours
        return scale * ties_combine(dropped, density=1.0)  # nothing left to trim

    return task_vector_merge(experts, base, combine)


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
    return task_vector_merge(
        experts, base, lambda _, d: scale * (d * breadcrumbs_mask(d, density, outliers)).sum(0))


def _smallest(rows: torch.Tensor, index: int) -> torch.Tensor:
    """Per row of (K, n): the value at 0-based ``index`` of the row sorted ascending, as (K, 1).
    Near either end a small topk finds it (the outlier clamp's cuts); elsewhere kthvalue."""
    n = rows.shape[1]
    if index < 4096:
        return rows.topk(index + 1, dim=1, largest=False, sorted=False).values.amax(1, keepdim=True)
    if n - index <= 4096:
        return rows.topk(n - index, dim=1, sorted=False).values.amin(1, keepdim=True)
    return rows.kthvalue(index + 1, dim=1, keepdim=True).values


def pcb_combine(deltas: torch.Tensor, density: float, outliers: float = 1e-4) -> torch.Tensor:
    """PCB on one tensor's K task vectors (K, *shape), step by step as the authors' release
    (duguodong7/pcb-merging, PCB_merge) computes it on a (K, n) matrix:

    1. clamp each task's |delta| to its own [outliers, 1 - outliers] order statistics (sorted
       indices int(n r) and int(n (1 - r)) - 1: for n < 1/r the top value is clamped to the
       second largest), and keep the signs: the task vectors that get merged;
    2. intra-balancing exp(K * minmax(|clamped delta_k|)^2), per task;
    3. inter-balancing tanh(delta_k * sum_j delta_j) on the unclamped task vectors: signed, so
       an entry that opposes the consensus scores below zero;
    4. score = intra * inter; each task keeps the entries above its sorted value at index
       int(n (1 - density)) (by the signed score, not its magnitude), rescaled to (0, 1] by
       (score - that value) / (max - that value), the rest 0;
    5. the merge is sum_k scale_k * clamped_k / max(sum_k scale_k, 1e-12).

    Column block by column block (as ties_combine), so that no temporary of the stack's size
    but the scores is built. The clamp's bounds are order statistics of the row, so they are the
    clamped row's own minimum and maximum (step 2's minmax), and the kept-score threshold is the
    clamped scores' minimum (step 4's). Constant rows give 0 where the release divides by 0.
    """
    k = deltas.shape[0]
    flat = deltas.reshape(k, -1).float()
    n = flat.shape[1]
    magnitude = flat.abs()
    lo = _smallest(magnitude, int(n * outliers))
    hi = _smallest(magnitude, max(int(n * (1 - outliers)) - 1, 0))
    del magnitude
    span = (hi - lo).clamp(min=1e-30)
    score = torch.empty_like(flat)
    for start in range(0, n, BLOCK):
        block = flat[:, start:start + BLOCK]
        consensus = block.sum(0, keepdim=True)
        intra = ((block.abs().clamp_(lo, hi) - lo) / span).square_().mul_(k).exp_()
        torch.mul(intra, (block * consensus).tanh_(), out=score[:, start:start + BLOCK])
    threshold = _smallest(score, min(int(n * (1 - density)), n - 1))
    score_span = (score.amax(1, keepdim=True) - threshold).clamp(min=1e-30)
    merged = torch.empty(n, device=flat.device)
    for start in range(0, n, BLOCK):
        block = flat[:, start:start + BLOCK]
        scale = (score[:, start:start + BLOCK].clamp(min=threshold) - threshold).div_(score_span)
        clamped = block.abs().clamp_(lo, hi).mul_(block.sign())
        torch.div((clamped * scale).sum(0), scale.sum(0).clamp_(min=1e-12), out=merged[start:start + BLOCK])
    return merged.reshape(deltas.shape[1:])


@MERGERS.register("pcb")
def pcb(
    experts: list[StateDict], base: StateDict | None, weights: torch.Tensor, *,
    density: Fraction = 0.2, scale: Scale = 1.0,
    outliers: Annotated[float, Field(ge=0, lt=0.5)] = 1e-4,
) -> StateDict:
    """PCB-merging: Du et al. 2024, "Parameter Competition Balancing for Model Merging" (NeurIPS),
    as the authors' release computes it (see pcb_combine): outlier clamp, intra-balancing
    exp(K * minmax(|delta_k|)^2) times inter-balancing tanh(delta_k * sum_j delta_j), each
    task keeps its top-``density`` signed scores rescaled to (0, 1], score-weighted mean of the
    clamped task vectors, added to the base times ``scale`` (the release's lambda: 1.2, or tuned
    by evolutionary search on validation data). Per tensor, like TIES here; the release works on
    the whole model flattened into one vector per task. The paper writes the inter-balancing
    term as a softmax; we follow the released code."""
    return task_vector_merge(experts, base, lambda _, d: scale * pcb_combine(d, density, outliers))
