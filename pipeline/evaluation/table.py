"""The comparison table as text: what `python -m pipeline.evaluate` and `python -m pipeline.report` print."""
from __future__ import annotations

COLUMNS = ("accuracy", "nll", "ece", "brier", "ece_scaled", "probe_accuracy", "knn_accuracy")


def format_table(rows: list[dict]) -> str:
    """One line per model; a column a model lacks (the ensemble has no features to probe) is '-'."""
    lines = [f"{'model':<18}{'kind':<12}{'accuracy':>9}{'nll':>9}{'ece':>9}{'brier':>9}{'ece(T)':>9}{'probe':>9}{'kNN':>9}"]
    for r in rows:
        lines.append(f"{r['model']:<18}{r['kind']:<12}" + "".join(
            f"{float(r[k]):>9.4f}" if r.get(k, "") != "" else f"{'-':>9}" for k in COLUMNS))
    return "\n".join(lines)
