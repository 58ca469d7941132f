"""Every model side by side: the computation of the evaluate stage, no files and no tracking.

Models: the pretrained backbone, each expert, each merged model, and the experts' logit
ensemble (mean of logits; the reference a merge tries to reach at the cost of one model).
Metrics: accuracy, NLL, ECE, Brier score, NLL and ECE after temperature scaling (the
temperature fitted on the validation split, Guo et al. 2017), per-class accuracy, accuracy on
each shard's own label distribution, and a linear probe and kNN on each model's frozen
features (pipeline.evaluation.probes). For pairs of experts, mergeability diagnostics
(pipeline.evaluation.diagnostics): interpolation barrier, task-vector cosine, sign conflicts.
The merge-gap table compares every merger with the best expert and the ensemble, on the test
split and on each shard's label distribution.

What grows with the data is bounded (``Protocol``): probes are fitted on a fixed-size subset of
the training split, the interpolation curves recompute BatchNorm on a fixed-size training subset
and are scored on a fixed-size test subset, for at most a fixed number of expert pairs. So
evaluation costs O(models x test split) plus a constant, at any N and K.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import nn

from pipeline.evaluation.diagnostics import barriers, interpolation_curve, sign_conflict_share, task_vector_cosine
from pipeline.evaluation.metrics import (
    accuracy,
    classification_report,
    fit_temperature,
    per_class_accuracy,
    reliability_bins,
    shard_accuracy,
)
from pipeline.evaluation.probes import probe_scores
from pipeline.nn.batchnorm import has_batchnorm
from pipeline.nn.inference import predict_logits


def r6(v: float) -> float:
    return round(float(v), 6)


@dataclass(frozen=True)
class Splits:
    """The tensors evaluation reads: the test and validation splits whole, and the bounded
    training subsets (probe_*: what the probes fit on; x_bn: what BatchNorm is recomputed on
    along an interpolation line; x_curve/y_curve: the test subset a curve is scored on)."""

    x_test: torch.Tensor
    y_test: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_probe: torch.Tensor
    y_probe: torch.Tensor
    x_bn: torch.Tensor
    x_curve: torch.Tensor
    y_curve: torch.Tensor
    classes: list[str]


@dataclass(frozen=True)
class Protocol:
    """What each figure was computed on; written beside the metrics."""

    probe_train_samples: int
    bn_recalibration_samples: int
    interpolation_test_samples: int
    pairs: list[tuple[str, str]]
    pairs_of: int


@dataclass
class Comparison:
    models: dict[str, dict] = field(default_factory=dict)  # name -> metrics (and shard accuracies)
    rows: list[dict] = field(default_factory=list)  # models.csv
    shard_rows: list[dict] = field(default_factory=list)
    class_rows: list[dict] = field(default_factory=list)
    reliability_rows: list[dict] = field(default_factory=list)
    curves: dict[str, dict] = field(default_factory=dict)  # reliability curves by model
    val_accuracy: dict[str, float] = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    gap_rows: list[dict] = field(default_factory=list)
    pair_rows: list[dict] = field(default_factory=list)
    curve_rows: list[dict] = field(default_factory=list)


def choose_pairs(experts: list[str], limit: int, seed: int) -> list[tuple[str, str]]:
    """All pairs of experts, or a seeded sample of ``limit`` of them, in a stable order."""
    pairs = list(itertools.combinations(experts, 2))
    if len(pairs) <= limit:
        return pairs
    picked = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed))[:limit].sort().values
    return [pairs[i] for i in picked.tolist()]


def compare(models: Iterable[tuple[str, str, nn.Module]], splits: Splits, shard_histograms: torch.Tensor,
            pairs: list[tuple[str, str]], ece_bins: int, batch_size: int, interpolation_points: int) -> Comparison:
    """Score every (name, kind, model) of ``models`` (taken one at a time, so a caller may load
    them lazily); kinds are pretrained, expert, merged, federated. Adds the experts' ensemble."""
    out = Comparison()
    test_logits, val_logits, kinds, probes, states = {}, {}, {}, {}, {}
    arch = None
    for name, kind, model in models:
        test_logits[name] = predict_logits(model, splits.x_test, batch_size)
        val_logits[name] = predict_logits(model, splits.x_val, batch_size)
        probes[name] = probe_scores(model, splits.x_probe, splits.y_probe, splits.x_test, splits.y_test,
                                    batch_size=batch_size)
        kinds[name] = kind
        if kind == "pretrained" or any(name in p for p in pairs):
            states[name] = {k: v.clone() for k, v in model.state_dict().items()}
        arch = model
    experts = [n for n, k in kinds.items() if k == "expert"]
    for logits in (test_logits, val_logits):
        logits["ensemble"] = torch.stack([logits[n] for n in experts]).mean(0)
    kinds["ensemble"] = "ensemble"
    out.val_accuracy = {n: accuracy(v, splits.y_val) for n, v in val_logits.items()}

    y, c = splits.y_test, len(splits.classes)
    for name, logits in test_logits.items():
        temperature = fit_temperature(val_logits[name], splits.y_val)
        report = {k: r6(v) for k, v in classification_report(logits, y, ece_bins, temperature).items()}
        report.update({k: r6(v) for k, v in probes.get(name, {}).items()})
        class_acc = per_class_accuracy(logits, y, c)
        out.class_rows += [{"model": name, "class": splits.classes[i], "accuracy": r6(a)}
                           for i, a in enumerate(class_acc.tolist())]
        per_shard = {f"shard_{k}": r6(shard_accuracy(class_acc, shard_histograms[k]))
                     for k in range(len(shard_histograms))}
        out.models[name] = {**report, "shard_accuracy": per_shard}
        out.rows.append({"model": name, "kind": kinds[name], **report})
        out.shard_rows += [{"model": name, "shard": s, "accuracy": a} for s, a in per_shard.items()]
        bins = reliability_bins(logits.softmax(1), y, ece_bins)
        out.curves[name] = {k: v.cpu().numpy() for k, v in bins.items()}
        out.reliability_rows += [
            {"model": name, "bin": b, "confidence": r6(bins["confidence"][b]), "accuracy": r6(bins["accuracy"][b]),
             "count": int(bins["count"][b])}
            for b in range(ece_bins)
        ]

    merged = [n for n, k in kinds.items() if k == "merged"]
    out.summary = summarise(out.models, experts, merged, out.val_accuracy)
    out.gap_rows = merge_gap_rows(out.models, experts, merged)
    out.pair_rows, out.curve_rows = pair_diagnostics(arch, states, pairs, splits, interpolation_points, batch_size)
    return out


def summarise(models: dict, experts: list[str], merged: list[str], val_accuracy: dict[str, float]) -> dict:
    best_expert = max(experts, key=lambda n: models[n]["accuracy"])
    summary = {
        "best_expert": best_expert,
        "best_expert_accuracy": models[best_expert]["accuracy"],
        "mean_expert_accuracy": r6(sum(models[n]["accuracy"] for n in experts) / len(experts)),
        "ensemble_accuracy": models["ensemble"]["accuracy"],
        "merge_gap": {
            n: {"vs_best_expert": r6(models[n]["accuracy"] - models[best_expert]["accuracy"]),
                "to_ensemble": r6(models["ensemble"]["accuracy"] - models[n]["accuracy"])}
            for n in merged
        },
    }
    if merged:
        summary["best_merged_by_val"] = max(merged, key=lambda n: val_accuracy[n])
    return summary


def merge_gap_rows(models: dict, experts: list[str], merged: list[str]) -> list[dict]:
    """Per merger and split (the test split, then each shard's label distribution): merged
    minus the best expert there, and the ensemble minus merged."""
    splits = [("test", lambda n: models[n]["accuracy"])]
    splits += [(s, lambda n, s=s: models[n]["shard_accuracy"][s]) for s in models[experts[0]]["shard_accuracy"]]
    rows = []
    for name in merged:
        for split, acc in splits:
            best = max(experts, key=acc)
            rows.append({"merger": name, "split": split, "merged": acc(name), "best_expert": best,
                         "best_expert_accuracy": acc(best), "ensemble": acc("ensemble"),
                         "merged_minus_best_expert": r6(acc(name) - acc(best)),
                         "ensemble_minus_merged": r6(acc("ensemble") - acc(name))})
    return rows


def pair_diagnostics(model: nn.Module, states: dict, pairs: list[tuple[str, str]], splits: Splits, points: int,
                     batch_size: int) -> tuple[list[dict], list[dict]]:
    """Interpolation barrier, task-vector cosine and sign conflicts for each chosen pair."""
    recal = splits.x_bn if has_batchnorm(model) else None
    pair_rows, curve_rows = [], []
    for a, b in pairs:
        curve = interpolation_curve(model, states[a], states[b], points, splits.x_curve, splits.y_curve, recal,
                                    batch_size)
        pair = f"{a}~{b}"
        curve_rows += [{"pair": pair, **{k: r6(v) for k, v in r.items()}} for r in curve]
        pair_rows.append({"expert_a": a, "expert_b": b,
                          "task_vector_cosine": r6(task_vector_cosine(states[a], states[b], states["pretrained"])),
                          "sign_conflicts": r6(sign_conflict_share(states[a], states[b], states["pretrained"])),
                          **{k: r6(v) for k, v in barriers(curve).items()}})
    return pair_rows, curve_rows
