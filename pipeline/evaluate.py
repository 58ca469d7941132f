"""Stage evaluate: every model side by side on the test split (pipeline.evaluation.compare
computes; this module reads the checkpoints, writes the tables and plots, and records them).

The merged model with the best validation accuracy gets the registry alias ``best``.
"""
from __future__ import annotations

import torch

from pipeline.evaluation.compare import Protocol, Splits, choose_pairs, compare
from pipeline.evaluation.subsets import fixed_subset
from pipeline.evaluation.table import format_table
from pipeline.io import layout, plots
from pipeline.io.checkpoints import write_csv, write_json
from pipeline.io.stage_io import load_manifest, load_model, load_prepared
from pipeline.io.tracking import Tracker
from pipeline.runtime import cli, config


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
        loaded = ((name, kind, load_model(path, device)[0]) for name, kind, path in candidates)
        result = compare(loaded, splits, hists, protocol.pairs, cfg.ece_bins, cfg.batch_size,
                         cfg.interpolation_points)
        outs = write_outputs(result, protocol)
        tracker.record_outputs(outs)
        tracker.log_metrics(flat_metrics(result))
        tracker.log_artifacts(outs)
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
    plots.comparison_chart(r.rows, layout.COMPARISON_PNG)
    merged = [row["model"] for row in r.rows if row["kind"] == "merged"]
    shown = ["pretrained", r.summary["best_expert"], "ensemble"] + merged
    plots.reliability_diagram({n: r.curves[n] for n in shown}, layout.RELIABILITY_PNG)
    return [layout.METRICS, layout.MODELS_CSV, layout.SHARDS_CSV, layout.RELIABILITY_CSV, layout.PER_CLASS_CSV,
            layout.MERGE_GAP_CSV, layout.PAIRS_CSV, layout.INTERPOLATION_CSV,
            layout.COMPARISON_PNG, layout.RELIABILITY_PNG, layout.INTERPOLATION_PNG]


def flat_metrics(r) -> dict[str, float]:
    flat = {f"{n}.{k}": v for n, m in r.models.items() for k, v in m.items() if isinstance(v, float)}
    flat.update({f"{n}.{s}": a for n, m in r.models.items() for s, a in m["shard_accuracy"].items()})
    flat.update({f"pair.{row['expert_a']}.{row['expert_b']}.{k}": v for row in r.pair_rows for k, v in row.items()
                 if isinstance(v, float)})
    return flat


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
