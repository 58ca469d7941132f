"""Print where a pipeline run's results are: the metrics table, the plots, the MLflow UI.

Run: python -m pipeline.report   (after `dvc repro` or the Prefect flow)
"""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

from pipeline.io import layout
from pipeline.evaluation.table import format_table
from pipeline.io.tracking import tracking_uri


def main() -> int:
    if not layout.METRICS.exists():
        print(f"no results yet: {layout.METRICS} is missing; run `dvc repro` or `python -m flows.pipeline_flow`")
        return 1
    rows = list(csv.DictReader(layout.MODELS_CSV.open()))
    summary = json.loads(layout.METRICS.read_text())["summary"]
    print()
    print(format_table(rows))
    print(f"\nbest expert {summary['best_expert']} {summary['best_expert_accuracy']:.4f}, "
          f"ensemble {summary['ensemble_accuracy']:.4f}; merged minus best expert: "
          + ", ".join(f"{n} {g['vs_best_expert']:+.4f}" for n, g in summary["merge_gap"].items()))
    uri = tracking_uri(Path("."))
    print(f"""
metrics     {layout.METRICS}   (dvc metrics show)
tables      {layout.MODELS_CSV}, {layout.SHARDS_CSV}, {layout.PER_CLASS_CSV}, {layout.RELIABILITY_CSV}
            (ece(T): ECE after temperature scaling fitted on the validation split;
             probe, kNN: linear probe and 20-NN on each model's frozen features)
            {layout.MERGE_GAP_CSV} (per merger, test split and each shard), {layout.PAIRS_CSV} and
            {layout.INTERPOLATION_CSV} (interpolation barrier, task-vector cosine, sign conflicts)
rounds      {layout.ROUNDS_CSV} (federate: per-round accuracy, loss, client drift, ensemble gap)
partition   {layout.PARTITION_CARD}
plots       {layout.COMPARISON_PNG}, {layout.RELIABILITY_PNG}, {layout.INTERPOLATION_PNG}, {layout.PARTITION_PNG}
            dvc plots show   (writes dvc_plots/index.html)
MLflow UI   .venv/bin/mlflow ui --backend-store-uri {uri}   then open http://127.0.0.1:5000
model       mlflow.pyfunc.load_model("models:/mixmerge-merged@best")
            mlflow.pyfunc.load_model("models:/mixmerge-federated@<run>")   (federate's global models)""")
    return 0


if __name__ == "__main__":
    sys.exit(main())
