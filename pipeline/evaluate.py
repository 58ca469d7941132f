"""Stage evaluate: every model side by side on the test split (pipeline.evaluation.compare
computes; this module reads the checkpoints, writes the tables and plots, and records them).

The merged model with the best validation accuracy gets the registry alias ``best``.
"""
from __future__ import annotations

import csv

import torch

from pipeline.evaluation.compare import Protocol, Splits, choose_pairs, compare
from pipeline.evaluation.subsets import fixed_subset
from pipeline.evaluation.table import format_table
from pipeline.io import layout, plots
from pipeline.io.checkpoints import md5, write_csv, write_json
from pipeline.io.stage_io import load_manifest, load_model, load_prepared, split_digest
from pipeline.io.tracking import Tracker
from pipeline.runtime import cli, config
from pipeline.runtime.progress import ComputeClock


def main(argv: list[str] | None = None) -> None:
    args = cli.parser("evaluate").parse_args(argv)
    base, cfg = config.load("evaluate", args.params)
    device = cli.setup(base.seed, base.device, base.torch_threads)
    data = load_prepared(device, base.data_path)
    manifest = load_manifest()
    hists = torch.tensor([s["label_histogram"] for s in manifest["shards"]])
    candidates = [("pretrained", "pretrained", layout.PRETRAINED)]
    candidates += [(f"expert_{k}", "expert", layout.expert(k)) for k in base.shards]
    candidates += [(f.stem, "merged", f) for f in sorted(layout.MERGED.glob("*.safetensors"))]
    candidates += [(f"fed_{f.stem}", "federated", f) for f in sorted(layout.FEDERATED.glob("*.safetensors"))]
    missing = [str(p) for _, _, p in candidates if not p.exists()]
    if missing:
        raise config.ConfigError(f"inputs missing (run the earlier stages): {', '.join(missing)}")

    splits, protocol = bounded_splits(data, [n for n, kind, _ in candidates if kind == "expert"], cfg, base.seed)
    with Tracker("evaluate", "evaluate", params_file=args.params) as tracker:
        tracker.log_params({"base": base.model_dump(), "evaluate": cfg.model_dump()})
        inputs = [layout.DATASET, layout.MANIFEST] + [p for _, _, p in candidates]
        producers = tracker.record_inputs(inputs)
        dataset_md5 = md5(layout.DATASET)
        for split in ("test", "validation"):
            tracker.log_dataset(split, layout.DATASET, split_digest(dataset_md5, split), split)
        loaded = ((name, kind, load_model(path, device)[0]) for name, kind, path in candidates)
        clock = ComputeClock(device)
        with clock.measure():  # the checkpoints are read lazily, inside: a small part on local disk
            result = compare(loaded, splits, hists, protocol.pairs, cfg.ece_bins, cfg.batch_size,
                             cfg.interpolation_points)
        outs = write_outputs(result, protocol)
        tracker.record_outputs(outs)
        tracker.log_metrics({**summary_metrics(result), "compute_seconds": clock.seconds})
        tracker.log_artifacts(outs)
        record_models(tracker, result, {name: (kind, str(path)) for name, kind, path in candidates}, producers)
        if "best_merged_by_val" in result.summary:
            _alias_best(tracker, producers, result.summary["best_merged_by_val"])
    print(format_table(result.rows))
    print(describe(protocol, len(data.y_train), len(data.y_test)))


def bounded_splits(data, experts: list[str], cfg, seed: int) -> tuple[Splits, Protocol]:
    """The splits evaluation reads, with the training-side and curve-side parts cut to the
    configured sizes (seeded subsets), and the record of what was cut."""
    probe = fixed_subset(len(data.y_train), cfg.probe_samples, seed)
    bn = fixed_subset(len(data.y_train), cfg.bn_samples, seed + 1)
    curve = fixed_subset(len(data.y_test), cfg.interpolation_samples, seed + 2)
    pairs = choose_pairs(experts, cfg.interpolation_pairs, seed)
    at = lambda x, idx: x[idx.to(x.device)]  # noqa: E731  (images may stay in host memory)
    splits = Splits(data.x_test, data.y_test, data.x_val, data.y_val, at(data.x_train, probe),
                    at(data.y_train, probe), at(data.x_train, bn), at(data.x_test, curve), at(data.y_test, curve),
                    data.meta["classes"])
    protocol = Protocol(len(probe), len(bn), len(curve), pairs, len(experts) * (len(experts) - 1) // 2)
    return splits, protocol


def describe(p: Protocol, n_train: int, n_test: int) -> str:
    return (f"evaluate: probes fitted on {p.probe_train_samples} of {n_train} training images; "
            f"interpolation curves for {len(p.pairs)} of {p.pairs_of} expert pairs, scored on "
            f"{p.interpolation_test_samples} of {n_test} test images, BatchNorm recomputed on "
            f"{p.bn_recalibration_samples} training images")


def write_outputs(r, protocol: Protocol) -> list:
    """The DVC metrics file, the plot tables and the figures; returns their paths."""
    write_json(layout.METRICS, {"test": r.models, "summary": r.summary, "pairs": r.pair_rows,
                                "protocol": {**protocol.__dict__, "pairs": [list(p) for p in protocol.pairs]}})
    write_csv(layout.MODELS_CSV, r.rows, ["model", "kind", "accuracy", "nll", "ece", "brier", "temperature",
                                          "nll_scaled", "ece_scaled", "probe_accuracy", "knn_accuracy"])
    write_csv(layout.MERGE_GAP_CSV, r.gap_rows, list(r.gap_rows[0]) if r.gap_rows else ["merger"])
    write_csv(layout.PAIRS_CSV, r.pair_rows, list(r.pair_rows[0]) if r.pair_rows else ["expert_a"])
    write_csv(layout.INTERPOLATION_CSV, r.curve_rows, ["pair", "t", "loss", "accuracy"])
    plots.interpolation_chart(r.curve_rows, layout.INTERPOLATION_PNG)
    write_csv(layout.PER_CLASS_CSV, r.class_rows, ["model", "class", "accuracy"])
    write_csv(layout.SHARDS_CSV, r.shard_rows, ["model", "shard", "accuracy"])
    write_csv(layout.RELIABILITY_CSV, r.reliability_rows, ["model", "bin", "confidence", "accuracy", "count"])
    write_csv(layout.TRAINING_CSV, training_rows(), TRAINING_COLUMNS)
    plots.comparison_chart(r.rows, layout.COMPARISON_PNG)
    merged = [row["model"] for row in r.rows if row["kind"] == "merged"]
    shown = ["pretrained", r.summary["best_expert"], "ensemble"] + merged
    plots.reliability_diagram({n: r.curves[n] for n in shown}, layout.RELIABILITY_PNG)
    return [layout.METRICS, layout.TRAINING_CSV, layout.MODELS_CSV, layout.SHARDS_CSV, layout.RELIABILITY_CSV, layout.PER_CLASS_CSV,
            layout.MERGE_GAP_CSV, layout.PAIRS_CSV, layout.INTERPOLATION_CSV,
            layout.COMPARISON_PNG, layout.RELIABILITY_PNG, layout.INTERPOLATION_PNG]


TRAINING_COLUMNS = ["run", "epoch", "loss", "val_loss", "val_accuracy"]


def training_rows() -> list[dict]:
    """Each training run's history (pretrain.csv, shard_K.csv) as rows of one table, the run
    named by its file; columns a run did not record (pretrain's validation) stay empty."""
    rows = []
    for f in sorted(layout.HISTORY.glob("*.csv")):
        with f.open(newline="") as fh:
            rows += [{c: row.get(c, "") for c in TRAINING_COLUMNS[1:]} | {"run": f.stem} for row in csv.DictReader(fh)]
    return rows


def summary_metrics(r) -> dict[str, float]:
    """The evaluate run's own metrics: the summary and the pair diagnostics. Each model's
    scores go to a run of its own (record_models)."""
    flat = {k: v for k, v in r.summary.items() if isinstance(v, float)}
    flat.update({f"merge_gap.{m}.{k}": v for m, gaps in r.summary.get("merge_gap", {}).items() for k, v in gaps.items()})
    flat.update({f"pair.{row['expert_a']}.{row['expert_b']}.{k}": v for row in r.pair_rows for k, v in row.items()
                 if isinstance(v, float)})
    return flat


def model_metrics(scores: dict) -> dict[str, float]:
    """One model's test scores under the keys every model shares (MLflow's Compare view and
    chart view put models side by side by key)."""
    flat = {k: v for k, v in scores.items() if isinstance(v, float)}
    flat.update({f"{shard}_accuracy": a for shard, a in scores["shard_accuracy"].items()})
    return flat


def record_models(tracker: Tracker, r, files: dict[str, tuple[str, str]], producers: dict[str, str]) -> None:
    """One run per evaluated model, all with the same metric keys, listed as rows of their own
    (tagged with the evaluate run); its description links the run that made the model. A registered model's test scores
    are also logged against its logged model (the experiment's Models tab)."""
    experts = [n for n, (kind, _) in files.items() if kind == "expert"]
    for name, scores in r.models.items():
        kind, path = files.get(name, ("ensemble", ""))
        made_by = {path: producers[path]} if path in producers else {
            files[e][1]: producers[files[e][1]] for e in experts if files[e][1] in producers}
        with tracker.nested(f"evaluate/{name}", {"mixmerge.role": "evaluation", "mixmerge.model": name,
                                   "mixmerge.model_kind": kind}, listed=True) as child:
            child.log_params({"model": name, "kind": kind, "file": path or "ensemble of the experts' softmax"})
            logged = tracker.logged_model_of(producers.get(path)) if kind in ("merged", "federated") else None
            child.log_metrics(model_metrics(scores), model_id=logged)  # a registered model's scores are its own too
            child.describe(made_by, heading=f"{name} ({kind}) was made by")


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
