"""Stage evaluate: every model side by side on the test split.

Models: the pretrained backbone, each expert, each merged model, and the experts' logit
ensemble (mean of logits; the reference a merge tries to reach at the cost of one model).
Metrics: accuracy, NLL, ECE, Brier score, NLL and ECE after temperature scaling (the
temperature fitted on the validation split, Guo et al. 2017), per-class accuracy, and
accuracy on each shard's own label distribution, and a linear probe and kNN on each model's
frozen features (pipeline.evaluation.probes). For each pair of experts, mergeability diagnostics
(pipeline.evaluation.diagnostics): interpolation barrier, task-vector cosine, sign conflicts. The
merge-gap table compares every merger with the best expert and the ensemble, on the test
split and on each shard's label distribution. The merged model with the best validation
accuracy gets the registry alias ``best``.
"""
from __future__ import annotations

import itertools

import torch

from pipeline.runtime import cli, config
from pipeline.io import layout, plots
from pipeline.nn.batchnorm import has_batchnorm
from pipeline.evaluation.diagnostics import barriers, interpolation_curve, sign_conflict_share, task_vector_cosine
from pipeline.io.checkpoints import write_csv, write_json
from pipeline.evaluation.table import format_table
from pipeline.evaluation.metrics import (
    accuracy,
    classification_report,
    fit_temperature,
    per_class_accuracy,
    reliability_bins,
    shard_accuracy,
)
from pipeline.evaluation.probes import probe_scores
from pipeline.io.stage_io import load_model, load_manifest, load_prepared
from pipeline.io.tracking import Tracker
from pipeline.nn.inference import predict_logits



def r6(v: float) -> float:
    return round(float(v), 6)


def main(argv: list[str] | None = None) -> None:
    args = cli.parser("evaluate").parse_args(argv)
    base, cfg = config.load("evaluate", args.params)
    device = cli.setup(base.seed, base.device, base.torch_threads)
    data = load_prepared(device, base.data_path)
    manifest = load_manifest()
    hists = torch.tensor([s["label_histogram"] for s in manifest["shards"]])
    merged_files = sorted(layout.MERGED.glob("*.safetensors"))
    candidates = [("pretrained", "pretrained", layout.PRETRAINED)]
    candidates += [(f"expert_{k}", "expert", layout.expert(k)) for k in base.shards]
    candidates += [(f.stem, "merged", f) for f in merged_files]
    missing = [str(p) for _, _, p in candidates if not p.exists()]
    if missing:
        raise config.ConfigError(f"inputs missing (run the earlier stages): {', '.join(missing)}")

    with Tracker("evaluate", "evaluate", params_file=args.params) as tracker:
        tracker.log_params({"base": base.model_dump(), "evaluate": cfg.model_dump()})
        inputs = [layout.DATASET, layout.MANIFEST] + [p for _, _, p in candidates]
        producers = tracker.record_inputs(inputs)

        test_logits, val_logits, kinds, probes, states = {}, {}, {}, {}, {}
        for name, kind, path in candidates:
            model, _ = load_model(path, device)
            test_logits[name] = predict_logits(model, data.x_test, cfg.batch_size)
            val_logits[name] = predict_logits(model, data.x_val, cfg.batch_size)
            probes[name] = probe_scores(model, data.x_train, data.y_train, data.x_test, data.y_test,
                                        batch_size=cfg.batch_size)
            kinds[name] = kind
            if kind in ("pretrained", "expert"):
                states[name] = {k: v.clone() for k, v in model.state_dict().items()}
        experts = [n for n, k in kinds.items() if k == "expert"]
        for logits in (test_logits, val_logits):
            logits["ensemble"] = torch.stack([logits[n] for n in experts]).mean(0)
        kinds["ensemble"] = "ensemble"
        val_acc = {n: accuracy(v, data.y_val) for n, v in val_logits.items()}

        y, n_bins, c = data.y_test, cfg.ece_bins, data.num_classes
        models, rows, shard_rows, rel_rows, class_rows, curves = {}, [], [], [], [], {}
        for name, logits in test_logits.items():
            temperature = fit_temperature(val_logits[name], data.y_val)
            report = {k: r6(v) for k, v in classification_report(logits, y, n_bins, temperature).items()}
            report.update({k: r6(v) for k, v in probes.get(name, {}).items()})
            class_acc = per_class_accuracy(logits, y, c)
            class_rows += [{"model": name, "class": data.meta["classes"][i], "accuracy": r6(a)}
                           for i, a in enumerate(class_acc.tolist())]
            per_shard = {f"shard_{k}": r6(shard_accuracy(class_acc, hists[k])) for k in range(len(hists))}
            models[name] = {**report, "shard_accuracy": per_shard}
            rows.append({"model": name, "kind": kinds[name], **report})
            shard_rows += [{"model": name, "shard": s, "accuracy": a} for s, a in per_shard.items()]
            bins = reliability_bins(logits.softmax(1), y, n_bins)
            curves[name] = {k: v.cpu().numpy() for k, v in bins.items()}
            rel_rows += [
                {"model": name, "bin": b, "confidence": r6(bins["confidence"][b]), "accuracy": r6(bins["accuracy"][b]),
                 "count": int(bins["count"][b])}
                for b in range(n_bins)
            ]

        best_expert = max(experts, key=lambda n: models[n]["accuracy"])
        merged_names = [n for n, k in kinds.items() if k == "merged"]
        summary = {
            "best_expert": best_expert,
            "best_expert_accuracy": models[best_expert]["accuracy"],
            "mean_expert_accuracy": r6(sum(models[n]["accuracy"] for n in experts) / len(experts)),
            "ensemble_accuracy": models["ensemble"]["accuracy"],
            "merge_gap": {
                n: {"vs_best_expert": r6(models[n]["accuracy"] - models[best_expert]["accuracy"]),
                    "to_ensemble": r6(models["ensemble"]["accuracy"] - models[n]["accuracy"])}
                for n in merged_names
            },
        }
        if merged_names:
            summary["best_merged_by_val"] = max(merged_names, key=lambda n: val_acc[n])
        gap_rows = merge_gap_rows(models, experts, merged_names)
        # `model` is the last one loaded: any will do, they share one architecture
        pair_rows, curve_rows = pair_diagnostics(model, states, experts, data, cfg)
        metrics = {"test": models, "summary": summary, "pairs": pair_rows}

        write_json(layout.METRICS, metrics)
        write_csv(layout.MODELS_CSV, rows, ["model", "kind", "accuracy", "nll", "ece", "brier", "temperature",
                                            "nll_scaled", "ece_scaled", "probe_accuracy", "knn_accuracy"])
        write_csv(layout.MERGE_GAP_CSV, gap_rows, list(gap_rows[0]) if gap_rows else ["merger"])
        write_csv(layout.PAIRS_CSV, pair_rows, list(pair_rows[0]) if pair_rows else ["expert_a"])
        write_csv(layout.INTERPOLATION_CSV, curve_rows, ["pair", "t", "loss", "accuracy"])
        plots.interpolation_chart(curve_rows, layout.INTERPOLATION_PNG)
        write_csv(layout.PER_CLASS_CSV, class_rows, ["model", "class", "accuracy"])
        write_csv(layout.SHARDS_CSV, shard_rows, ["model", "shard", "accuracy"])
        write_csv(layout.RELIABILITY_CSV, rel_rows, ["model", "bin", "confidence", "accuracy", "count"])
        plots.comparison_chart(rows, layout.COMPARISON_PNG)
        shown = ["pretrained", best_expert, "ensemble"] + merged_names
        plots.reliability_diagram({n: curves[n] for n in shown}, layout.RELIABILITY_PNG)

        outs = [layout.METRICS, layout.MODELS_CSV, layout.SHARDS_CSV, layout.RELIABILITY_CSV, layout.PER_CLASS_CSV,
                layout.MERGE_GAP_CSV, layout.PAIRS_CSV, layout.INTERPOLATION_CSV,
                layout.COMPARISON_PNG, layout.RELIABILITY_PNG, layout.INTERPOLATION_PNG]
        tracker.record_outputs(outs)
        flat = {f"{n}.{k}": v for n, m in models.items() for k, v in m.items() if isinstance(v, float)}
        flat.update({f"{n}.{s}": a for n, m in models.items() for s, a in m["shard_accuracy"].items()})
        flat.update({f"pair.{r['expert_a']}.{r['expert_b']}.{k}": v for r in pair_rows for k, v in r.items()
                     if isinstance(v, float)})
        tracker.log_metrics(flat)
        tracker.log_artifacts(outs)
        if merged_names:
            _alias_best(tracker, producers, summary["best_merged_by_val"])

    print(format_table(rows))


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


def pair_diagnostics(model, states: dict, experts: list[str], data, cfg) -> tuple[list[dict], list[dict]]:
    """Interpolation barrier, task-vector cosine and sign conflicts for every pair of experts."""
    recal = data.x_train if has_batchnorm(model) else None
    pair_rows, curve_rows = [], []
    for a, b in itertools.combinations(experts, 2):
        curve = interpolation_curve(model, states[a], states[b], cfg.interpolation_points, data.x_test,
                                    data.y_test, recal, cfg.batch_size)
        pair = f"{a}~{b}"
        curve_rows += [{"pair": pair, **{k: r6(v) for k, v in r.items()}} for r in curve]
        pair_rows.append({"expert_a": a, "expert_b": b,
                          "task_vector_cosine": r6(task_vector_cosine(states[a], states[b], states["pretrained"])),
                          "sign_conflicts": r6(sign_conflict_share(states[a], states[b], states["pretrained"])),
                          **{k: r6(v) for k, v in barriers(curve).items()}})
    return pair_rows, curve_rows


def _alias_best(tracker: Tracker, producers: dict[str, str], best: str) -> None:
    """Point the registry alias 'best' at the version that holds the best merged model."""
    run_id = producers.get(str(layout.MERGED / f"{best}.safetensors"))
    if run_id is None:
        return
    for mv in tracker.client.search_model_versions(f"run_id = '{run_id}'"):
        if mv.tags.get("mixmerge.merger") == best:
            tracker.client.set_registered_model_alias(mv.name, "best", mv.version)


if __name__ == "__main__":
    cli.run("evaluate", main)
