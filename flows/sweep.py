"""A study: a grid of parameter overrides, each cell a whole pipeline run, run concurrently.

Each cell gets its own folder ``sweeps/<grid>/<cell>/`` with its params.yaml and runs every
stage there in one process (flows.sweep_cell). All cells record into one MLflow experiment,
``mixmerge-sweep-<grid>``: a parent run per cell (its params say which cell) with the stage
runs under it. At the end the flow writes ``summary.csv``, ``summary.md`` (test accuracy,
mean +- std over seeds) and ``summary.png``, and logs them to that experiment.

A cell whose folder already holds results for the same params is not run again, so an
interrupted sweep resumes; a folder holding other params is refused, never overwritten.

Run: python -m flows.sweep [--grid default|smoke] [--workers 2]
"""
from __future__ import annotations

import copy
import csv
import itertools
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml
# Before Prefect loads its settings: the temporary server's telemetry heartbeat writes to the
# same SQLite file as the flow and prints a "database is locked" traceback that is not ours;
# MLflow's table-creation chatter is not the user's business either.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")

from prefect import flow, get_run_logger, task
from prefect.task_runners import ThreadPoolTaskRunner

from flows import stage_runner

from pipeline.runtime.config import set_key

REPO = Path(__file__).resolve().parents[1]
EXIT_BAD_CONFIG = 2

# Every merger that takes K = 4 experts (slerp merges exactly two), with params.yaml's options.
ALL_MERGERS = {
    "uniform": {"method": "uniform"},
    "fedavg": {"method": "fedavg"},
    "task_arithmetic": {"method": "task_arithmetic", "scale": 0.5},
    "ties": {"method": "ties", "density": 0.2, "scale": 1.0},
    "dare": {"method": "dare", "density": 0.5, "scale": 0.5},
    "dare_ties": {"method": "dare_ties", "density": 0.5, "scale": 1.0},
    "breadcrumbs": {"method": "breadcrumbs", "density": 0.9, "outliers": 0.01, "scale": 0.5},
    "model_stock": {"method": "model_stock"},
    "pcb": {"method": "pcb", "density": 0.2, "scale": 1.0},
    "fisher": {"method": "fisher"},
    "regmean": {"method": "regmean"},
    "greedy_soup": {"method": "greedy_soup"},
}

FEDERATED_ROUNDS = 30
# The client algorithms at their authors' benchmark settings, FedProx at the FedNTD authors' mu,
# and decentralised runs on K = 20 nodes (torus 4 x 5), merged once at the end; topology none
# is zero communication (each node alone from the shared start, merged once: the one-shot case).
FEDERATED_RUNS = {
    "fedavg": {"algorithm": "fedavg"},
    # FedAvgM at an effective server step lr / (1 - momentum) = 1 (Hsu et al.), FedAdam at Reddi et al.'s tau
    "fedavgm": {"algorithm": "fedavg", "server_momentum": 0.9, "server_lr": 0.1},
    "fedadam": {"algorithm": "fedavg", "server_optimizer": "adam", "server_lr": 0.01},
    "fedprox": {"algorithm": "fedprox", "mu": 1.0},
    "scaffold": {"algorithm": "scaffold"},
    "feddyn": {"algorithm": "feddyn"},
    "fedntd": {"algorithm": "fedntd"},
    "moon": {"algorithm": "moon"},
    "fedsol": {"algorithm": "fedsol"},
    "fedsol_fixed": {"algorithm": "fedsol", "adaptive": False},
    "gossip_ring": {"topology": "ring"},
    "gossip_torus": {"topology": "torus"},
    "gossip_random2": {"topology": "random", "peers": 2},
    "gossip_complete": {"topology": "complete"},
    "no_communication": {"topology": "none"},
}

PARTITIONS = {
    "dirichlet0.1": {"prepare.partition.method": "dirichlet", "prepare.partition.alpha": 0.1},
    "dirichlet1.0": {"prepare.partition.method": "dirichlet", "prepare.partition.alpha": 1.0},
    "iid": {"prepare.partition.method": "iid"},
}

# grid name -> (axes: name -> {label: overrides}, overrides shared by every cell)
GRIDS: dict[str, tuple[dict[str, dict[str, dict]], dict]] = {
    "default": (
        {
            "mixer": {m: {"mix_train.mixer": m} for m in ("none", "mixup", "cutmix")},
            "partition": PARTITIONS,
            "seed": {str(s): {"base.seed": s} for s in (0, 1, 2)},
        },
        {"merge.mergers": ALL_MERGERS, "merge.registered_model": None, "federate.registered_model": None,
         "federate.runs": {"fedavg": {"algorithm": "fedavg"}}},  # FedAvg beside the one-shot merges
    ),
    # every mixer, mix loss, pretrain method and the alignment step once, against the default
    # (mixup, soft cross-entropy, supervised pretraining, Dirichlet alpha 0.5), 2 seeds
    "methods": (
        {
            "setting": {
                "default": {},
                **{f"mixer={m}": {"mix_train.mixer": m}
                   for m in ("manifold_mixup", "resizemix", "saliencymix", "fmix", "gridmix", "smoothmix")},
                "mixer=mixup+cutmix": {"mix_train.mixer": {"mixup": 0.5, "cutmix": 0.5}},
                "loss=decoupled": {"mix_train.loss": {"method": "decoupled"}},
                "loss=rankmixup": {"mix_train.loss": {"method": "rankmixup"}},
                "label_smoothing=0.1": {"mix_train.label_smoothing": 0.1},
                **{f"pretrain={m}": {"pretrain.method": m}
                   for m in ("simclr", "supcon", "selfcon", "mixco", "barlow_twins", "mixed_barlow_twins")},
                "align=weight_matching": {"merge.align": "weight_matching"},
                "partition=pathological3": {"prepare.partition.method": "pathological",
                                           "prepare.partition.classes_per_shard": 3},  # 4 x 3 covers 10 classes
                "partition=quantity_skew": {"prepare.partition.method": "quantity_skew"},
                # SLERP merges exactly two experts
                "K=2 (+slerp)": {"base.shards": [0, 1],
                                 "merge.mergers": {**ALL_MERGERS, "slerp": {"method": "slerp", "t": 0.5}},
                                 "federate.runs": {"fedavg": {"algorithm": "fedavg"}}},  # a ring needs K >= 3
            },
            "seed": {str(s): {"base.seed": s} for s in (0, 1)},
        },
        {"merge.mergers": ALL_MERGERS, "merge.registered_model": None, "federate.registered_model": None,
         "federate.runs": {"fedavg": {"algorithm": "fedavg"}}},  # FedAvg beside the one-shot merges
    ),
    # Federated and decentralised learning on K = 20 clients from scratch (issue: rounds):
    # every client algorithm and topology as a run of one federate stage, two label skews, 3 seeds
    "federated": (
        {
            "partition": {f"dirichlet{a}": {"prepare.partition.method": "dirichlet", "prepare.partition.alpha": a}
                          for a in (0.1, 0.5)},
            "seed": {str(s): {"base.seed": s} for s in (0, 1, 2)},
        },
        {"base.shards": list(range(20)), "prepare.partition.min_shard_size": 5,
         "merge.mergers": {"fedavg": {"method": "fedavg"}, "ties": {"method": "ties", "density": 0.2}},
         "merge.registered_model": None, "evaluate.interpolation_pairs": 2, "evaluate.interpolation_points": 3,
         "federate.start": "scratch", "federate.rounds": FEDERATED_ROUNDS, "federate.local_epochs": 2,
         "federate.sample_fraction": 0.5, "federate.lr": 0.05, "federate.registered_model": None,
         "federate.runs": FEDERATED_RUNS},
    ),
    # a few seconds per cell: for tests and for trying the sweep machinery
    "smoke": (
        {
            "mixer": {m: {"mix_train.mixer": m} for m in ("none", "mixup")},
            "partition": {"iid": {"prepare.partition.method": "iid"}},
            "seed": {str(s): {"base.seed": s} for s in (0, 1)},
        },
        {"base.shards": [0, 1], "pretrain.epochs": 2, "pretrain.width": 8, "mix_train.epochs": 2,
         "evaluate.interpolation_points": 3, "merge.registered_model": None,
         "federate.rounds": 2, "federate.registered_model": None,
         "federate.runs": {"fedavg": {"algorithm": "fedavg"}, "fedprox": {"algorithm": "fedprox"}},
         "merge.mergers": {"fedavg": {"method": "fedavg"}, "ties": {"method": "ties"},
                           "greedy_soup": {"method": "greedy_soup"}}},
    ),
}


def cells(grid: str) -> list[tuple[str, dict[str, str], dict]]:
    """(cell name, {axis: label}, params) for every combination of the grid's axes."""
    axes, shared = GRIDS[grid]
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    for key, value in shared.items():
        set_key(base, key, copy.deepcopy(value))
    out = []
    for combo in itertools.product(*[list(v.items()) for v in axes.values()]):
        params = copy.deepcopy(base)
        labels = {}
        for axis, (label, overrides) in zip(axes, combo):
            labels[axis] = label
            for key, value in overrides.items():
                set_key(params, key, copy.deepcopy(value))
        out.append(("_".join(f"{a}-{lab}" for a, lab in labels.items()), labels, params))
    return out


class CellFolderInUse(RuntimeError):
    pass


def prepare_cell(cell_dir: Path, params: dict) -> bool:
    """Write the cell's params; True if it still has to run (False: its results are there)."""
    text = yaml.safe_dump(params, sort_keys=False)
    params_file = cell_dir / "params.yaml"
    if params_file.exists():
        if params_file.read_text() != text:
            raise CellFolderInUse(f"{cell_dir} holds a run with other params; remove it or sweep into another --out")
        return not (cell_dir / "results" / "metrics.json").exists()
    cell_dir.mkdir(parents=True, exist_ok=True)
    params_file.write_text(text)
    return True


@task(retries=1, retry_condition_fn=lambda t, r, state: not isinstance(state.result(raise_on_failure=False), ValueError),
      task_run_name="{name}")
def run_cell(name: str, cell_dir: str, env: dict[str, str]) -> str:
    # forked from the warm server (flows.stage_runner): a cell pays no interpreter start and
    # no torch or MLflow import of its own; its output, stdout and stderr, goes to its log
    lock = threading.Lock()
    with open(Path(cell_dir) / "log.txt", "w") as log:
        def to_log(stream):
            for line in stream:
                with lock:
                    log.write(line)
                    log.flush()

        if stage_runner.warm():
            returncode = stage_runner.run_module("flows.sweep_cell", [cell_dir], str(REPO), env, to_log, to_log).returncode
        else:  # a fresh interpreter per cell (MIXMERGE_COLD_STAGES=1)
            returncode = subprocess.run([sys.executable, "-m", "flows.sweep_cell", cell_dir], cwd=REPO, env=env,
                                        stdout=log, stderr=subprocess.STDOUT).returncode
    if returncode == EXIT_BAD_CONFIG:
        raise ValueError(f"{name}: bad configuration (see {cell_dir}/log.txt)")
    if returncode != 0:
        raise RuntimeError(f"{name}: exited with {returncode} (see {cell_dir}/log.txt)")
    return name


def _cell_env(experiment: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{(REPO / 'mlflow.db').resolve()}")
    env["MIXMERGE_EXPERIMENT"] = experiment
    env.pop("MIXMERGE_PARENT_RUN_ID", None)  # each cell is its own pipeline run
    return env


def summarise(grid: str, out: Path, done: list[tuple[str, dict[str, str]]]) -> list[dict]:
    """Test accuracy per (partition, mixer) and model: mean and std over the seed axis."""
    import json

    import numpy as np

    from pipeline.io import plots

    groups: dict[tuple, dict[str, list[float]]] = {}
    for name, labels in done:
        metrics = json.loads((out / name / "results" / "metrics.json").read_text())
        key = tuple((a, lab) for a, lab in labels.items() if a != "seed")
        acc = groups.setdefault(key, {})
        summary = metrics["summary"]
        acc.setdefault("pretrained", []).append(metrics["test"]["pretrained"]["accuracy"])
        acc.setdefault("mean expert", []).append(summary["mean_expert_accuracy"])
        acc.setdefault("best expert", []).append(summary["best_expert_accuracy"])
        acc.setdefault("ensemble", []).append(summary["ensemble_accuracy"])
        for model, m in metrics["test"].items():
            if model in summary["merge_gap"] or model.startswith("fed_"):
                acc.setdefault(model, []).append(m["accuracy"])
        # decentralised runs: the nodes on their own, without the final merge
        rounds_csv = out / name / "results" / "rounds.csv"
        last = {row["run"]: row for row in csv.DictReader(rounds_csv.open())} if rounds_csv.exists() else {}
        for run, row in last.items():
            if row.get("node_test_accuracy"):
                acc.setdefault(f"fed_{run} nodes (no final merge)", []).append(float(row["node_test_accuracy"]))
    columns = list(dict.fromkeys(c for g in groups.values() for c in g))
    rows = []
    for key, acc in groups.items():
        row = {a: lab for a, lab in key}
        for c in columns:
            vals = acc.get(c, [])
            row[f"{c} mean"] = round(statistics.fmean(vals), 4) if vals else ""
            row[f"{c} std"] = round(statistics.stdev(vals), 4) if len(vals) > 1 else 0.0
            row["seeds"] = len(vals)
        rows.append(row)
    keys = [a for a, _ in next(iter(groups))] if groups else []
    with open(out / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys + ["seeds"] + [f"{c} {s}" for c in columns for s in ("mean", "std")])
        w.writeheader()
        w.writerows(rows)
    # Markdown: one row per model, one column per setting (models outnumber settings).
    settings = [" ".join(r[k] for k in keys) for r in rows]
    lines = ["| model | " + " | ".join(settings) + " |", "|---|" + "---|" * len(settings)]
    for c in columns:
        lines.append(f"| {c} | " + " | ".join(
            f"{r[f'{c} mean']:.3f} ± {r[f'{c} std']:.3f}" if r[f"{c} mean"] != "" else "-" for r in rows) + " |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    values = np.array([[r[f"{c} mean"] if r[f"{c} mean"] != "" else np.nan for c in columns] for r in rows], dtype=float)
    plots.accuracy_heatmap([" ".join(r[k] for k in keys) for r in rows], columns, values,
                           f"sweep {grid}: test accuracy, mean over seeds", out / "summary.png")
    return rows


def _experiment(env: dict[str, str]) -> tuple[object, str]:
    """The sweep's MLflow experiment, created before any cell starts: cells that each found a
    new SQLite store would race to create its tables."""
    import mlflow

    from pipeline.io.tracking import ensure_experiment

    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    return client, ensure_experiment(client, REPO, env["MIXMERGE_EXPERIMENT"])


def _log_summary(client, exp_id: str, grid: str, out: Path, n_cells: int) -> None:
    run = client.create_run(exp_id, run_name=f"sweep-{grid}-summary", tags={"mixmerge.sweep": grid})
    client.log_param(run.info.run_id, "cells", n_cells)
    for f in ("summary.csv", "summary.md", "summary.png"):
        client.log_artifact(run.info.run_id, str(out / f))
    client.set_terminated(run.info.run_id)


MAX_ATTEMPTS = 3  # a cell whose worker died is run again, at most this many times in all


def _finished_cell_run(client, exp_id: str, name: str, params: dict):
    """The cell's finished record on the tracking server, if any (the newest, should a
    crashed attempt's flow have finished after all)."""
    from flows.cell_flow import params_digest

    runs = client.search_runs([exp_id], max_results=10, order_by=["attributes.end_time DESC"], filter_string=(
        f"tags.`mixmerge.cell` = '{name}' and tags.`mixmerge.params_digest` = '{params_digest(params)}' "
        f"and attributes.status = 'FINISHED'"))
    return runs[0] if runs else None


def run_on_pool(grid: str, pool: str, out: Path, client, exp_id: str, experiment: str, logger) -> tuple[list, list]:
    """Every cell as a flow run of the work pool's deployment; any free worker takes it. A run
    that crashes (its worker died: Prefect marks it so when its heartbeats stop) is run again,
    and the dead attempt's MLflow runs are marked KILLED, so each cell is recorded once.
    Results come back from the MLflow server into ``out``. Returns (ran, failed) cell names."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    from flows.cell_flow import DEPLOYMENT, FLOW_NAME, ensure_deployment

    ensure_deployment(pool)
    all_cells = cells(grid)
    todo = [(n, p) for n, _, p in all_cells if _finished_cell_run(client, exp_id, n, p) is None]
    logger.info(f"{len(all_cells)} cells, {len(all_cells) - len(todo)} already recorded, {len(todo)} to run on pool {pool}")

    def submit(name: str, params: dict, attempt: int) -> str:
        run = run_deployment(f"{FLOW_NAME}/{DEPLOYMENT}", timeout=0, as_subflow=False, parameters={
            "grid": grid, "name": name, "params": params, "experiment": experiment})
        logger.info(f"{name}: attempt {attempt} is flow run {run.name}")
        return str(run.id)

    pending = {submit(n, p, 1): (n, p, 1) for n, p in todo}
    ran, failed = [], []
    with get_client(sync_client=True) as prefect_client:
        while pending:
            time.sleep(2)
            for run_id, (name, params, attempt) in list(pending.items()):
                state = prefect_client.read_flow_run(run_id).state
                if state is None or not state.is_final():
                    continue
                del pending[run_id]
                if state.is_completed():
                    ran.append(name)
                    continue
                for r in client.search_runs([exp_id], filter_string=(
                        f"tags.`mixmerge.prefect_flow_run_id` = '{run_id}' and attributes.status = 'RUNNING'")):
                    client.set_terminated(r.info.run_id, "KILLED")  # the dead attempt's record
                if state.is_crashed() and attempt < MAX_ATTEMPTS:
                    logger.warning(f"{name}: {state.name} ({state.message}); running it again")
                    pending[submit(name, params, attempt + 1)] = (name, params, attempt + 1)
                else:
                    logger.error(f"{name}: {state.name}: {state.message}")
                    failed.append(name)
    for name, params in [(n, p) for n, _, p in all_cells]:
        record = _finished_cell_run(client, exp_id, name, params)
        if record is not None:
            (out / name).mkdir(parents=True, exist_ok=True)
            client.download_artifacts(record.info.run_id, "results", str(out / name))
    return ran, failed


@flow(name="mixmerge-sweep", task_runner=ThreadPoolTaskRunner(max_workers=8), log_prints=True)
def mixmerge_sweep(grid: str = "default", workers: int = 2, out_dir: str = "sweeps", pool: str | None = None,
                   experiment: str | None = None) -> dict:
    """Run every cell of ``grid`` (at most ``workers`` at once here, or as flow runs on the
    work pool ``pool``) and summarise over seeds."""
    logger = get_run_logger()
    if grid not in GRIDS:
        raise ValueError(f"unknown grid {grid!r}; choose one of {', '.join(GRIDS)}")
    out = (REPO / out_dir / grid).resolve()
    experiment = experiment or f"mixmerge-sweep-{grid}"
    env = _cell_env(experiment)
    client, exp_id = _experiment(env)
    all_cells = cells(grid)
    if pool:
        ran, failed = run_on_pool(grid, pool, out, client, exp_id, experiment, logger)
        return _finish(grid, out, client, exp_id, all_cells, ran, failed)
    todo = [(n, lab) for n, lab, p in all_cells if prepare_cell(out / n, p)]
    logger.info(f"{len(all_cells)} cells, {len(all_cells) - len(todo)} already done, {len(todo)} to run")
    failed = []
    for start in range(0, len(todo), workers):  # at most `workers` cell processes at a time
        futures = [run_cell.submit(n, str(out / n), env) for n, _ in todo[start : start + workers]]
        for (n, _), fut in zip(todo[start : start + workers], futures):
            fut.wait()
            if not fut.state.is_completed():
                failed.append(n)
    return _finish(grid, out, client, exp_id, all_cells, [n for n, _ in todo], failed)


def _finish(grid: str, out: Path, client, exp_id: str, all_cells: list, ran: list[str], failed: list[str]) -> dict:
    done = [(n, lab) for n, lab, _ in all_cells if (out / n / "results" / "metrics.json").exists()]
    rows = []
    if done:
        rows = summarise(grid, out, done)
        _log_summary(client, exp_id, grid, out, len(done))
        print((out / "summary.md").read_text())
    if failed:
        raise RuntimeError(f"{len(failed)} cells failed: {', '.join(failed)} (their log.txt says why)")
    return {"cells": len(all_cells), "ran": len(ran), "summary": str(out / "summary.md"), "rows": rows}


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(prog="python -m flows.sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("--grid", default="default", choices=sorted(GRIDS))
    p.add_argument("--workers", type=int, default=2, help="cells run at once (each uses base.torch_threads cores)")
    p.add_argument("--out", default="sweeps", help="folder for the cells and the summary (default: sweeps)")
    p.add_argument("--pool", default=os.environ.get("MIXMERGE_WORK_POOL") or None,
                   help="run the cells as flow runs on this Prefect work pool (default: $MIXMERGE_WORK_POOL; "
                        "unset: here, --workers at a time)")
    p.add_argument("--experiment", default=None, help="MLflow experiment of the cells (default: mixmerge-sweep-GRID)")
    args = p.parse_args()
    from flows.local_server import prefect_api

    with prefect_api():  # a server of this run's own when PREFECT_API_URL is not set
        mixmerge_sweep(grid=args.grid, workers=args.workers, out_dir=args.out, pool=args.pool,
                       experiment=args.experiment)
