"""Start-up against computation (issue 15): the default run through the flow, one sweep cell,
the smoke sweep's throughput, and each stage's import time, each before (every stage or cell a
fresh interpreter: MIXMERGE_COLD_STAGES=1, as `dvc repro` runs them) and after (forked from the
warm server of flows.stage_runner), side by side in one run.

"Computation" is what the stages report as ``compute_seconds`` (pipeline.runtime.progress
.ComputeClock): decoding and partitioning, training with its per-epoch validation, merging,
rounds, evaluating. Everything else (interpreter start, imports, reading and writing files,
tracking, DVC, Prefect) is overhead.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.workspace import REPO, make_project


def _env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL",
                                                             "MIXMERGE_PARENT_RUN_ID", "MIXMERGE_COLD_STAGES")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


def compute_seconds(root: Path) -> float:
    """The sum of every stage run's compute_seconds in a project's own MLflow store."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, filter_string="metrics.compute_seconds >= 0", max_results=10000)
    return sum(r.data.metrics["compute_seconds"] for r in runs)


def _ratio_row(name, target, cold_wall, cold_compute, warm_wall, warm_compute, note=""):
    cold, warm = cold_wall / cold_compute, warm_wall / warm_compute
    return {"row": name, "baseline": "a fresh interpreter each", "candidate": "forked warm",
            "baseline_value": cold, "candidate_value": warm, "unit": "x compute", "ratio": cold / warm,
            "reading": f"{cold:.2f}x -> {warm:.2f}x", "target": target,
            "note": (f"wall {cold_wall:.1f} s / compute {cold_compute:.1f} s -> wall {warm_wall:.1f} s / "
                     f"compute {warm_compute:.1f} s" + (f"; {note}" if note else ""))}


def bench_flow_overhead(device, repeats):
    """The default experiment through the flow on a fresh project, cold and warm stages."""
    walls, computes, servers = {}, {}, {}
    for mode, extra in (("cold", {"MIXMERGE_COLD_STAGES": "1"}), ("warm", {})):
        with tempfile.TemporaryDirectory() as tmp:
            root = make_project(Path(tmp), {})
            start = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "flows.pipeline_flow", "--project-dir", str(root)],
                                  cwd=root, env=_env(**extra), capture_output=True, text=True)
            walls[mode] = time.perf_counter() - start
            if proc.returncode:
                raise RuntimeError(f"flow ({mode}) failed: {proc.stderr[-2000:]}")
            servers[mode] = float(re.search(r"ready in ([\d.]+) s", proc.stdout + proc.stderr).group(1))
            computes[mode] = compute_seconds(root)
    out = _ratio_row("default run, flow (wall/compute)", "<= 2x", walls["cold"], computes["cold"], walls["warm"],
                     computes["warm"], note=f"Prefect server start {servers['cold']:.1f} / {servers['warm']:.1f} s "
                     f"included; without it {(walls['cold'] - servers['cold']) / computes['cold']:.2f}x -> "
                     f"{(walls['warm'] - servers['warm']) / computes['warm']:.2f}x")
    out.update({"wall_s": walls, "compute_s": computes, "server_start_s": servers})
    return out


def bench_sweep_cell(device, repeats):
    """One sweep cell (default params), as a fresh interpreter and forked from the warm server
    (started beforehand, as a sweep starts it once for all its cells)."""
    from flows import stage_runner

    stage_runner.run_module("json", [], str(REPO), _env(), lambda s: s.read(), lambda s: s.read())  # warm it up
    walls, computes = {}, {}
    for mode in ("cold", "warm"):
        with tempfile.TemporaryDirectory() as tmp:
            # laid out as a sweep lays out its cells (<sweep>/<grid>/<cell>), so the cell's DVC
            # cache is <sweep>/.dvc-cache: one per mode, neither restores what the other computed
            root = make_project(Path(tmp) / "grid" / "cell", {})
            start = time.perf_counter()
            if mode == "cold":
                rc = subprocess.run([sys.executable, "-m", "flows.sweep_cell", str(root)], cwd=REPO, env=_env(),
                                    capture_output=True).returncode
            else:
                rc = stage_runner.run_module("flows.sweep_cell", [str(root)], str(REPO), _env(),
                                             lambda s: s.read(), lambda s: s.read()).returncode
            walls[mode] = time.perf_counter() - start
            if rc:
                raise RuntimeError(f"sweep cell ({mode}) exited with {rc}")
            computes[mode] = compute_seconds(root)
    out = _ratio_row("sweep cell (wall/compute)", "<= 1.5x", walls["cold"], computes["cold"], walls["warm"],
                     computes["warm"])
    out.update({"wall_s": walls, "compute_s": computes})
    return out


def bench_sweep_throughput(device, repeats, grid="smoke", workers=2):
    """Cells per hour of the smoke grid, `python -m flows.sweep`, cold cells then warm ones."""
    rates = {}
    for mode, extra in (("cold", {"MIXMERGE_COLD_STAGES": "1"}), ("warm", {})):
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "flows.sweep", "--grid", grid, "--workers", str(workers),
                                   "--out", tmp], cwd=REPO, capture_output=True, text=True,
                                  env=_env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp}/mlflow.db", **extra))
            wall = time.perf_counter() - start
            if proc.returncode:
                raise RuntimeError(f"sweep ({mode}) failed: {proc.stderr[-2000:]}")
            cells = len(list(Path(tmp).rglob("results/metrics.json")))
            if not cells:
                raise RuntimeError(f"sweep ({mode}) finished no cell: {proc.stdout[-1000:]}")
            rates[mode] = 3600 * cells / wall
    return {"row": f"sweep throughput ({grid}, {workers} workers)", "baseline": "a fresh interpreter per cell",
            "candidate": "forked warm", "baseline_value": rates["cold"], "candidate_value": rates["warm"],
            "unit": "cells/hour", "ratio": rates["warm"] / rates["cold"],
            "reading": f"{rates['cold']:.0f} -> {rates['warm']:.0f}/h", "target": "more cells per hour",
            "note": "wall time includes the sweep's own Prefect server start and summary"}


STAGES = ["prepare", "pretrain", "mix_train", "merge", "federate", "evaluate"]


def import_seconds(module: str) -> float:
    """`python -X importtime -c 'import module'`: the cumulative time of the top-level imports,
    plus MLflow's tracking store, which every stage loads when it opens its run."""
    code = f"import {module}; import mlflow.store.tracking.sqlalchemy_store"
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", code], cwd=REPO, env=_env(),
                          capture_output=True, text=True, check=True)
    total = 0
    for line in proc.stderr.splitlines():
        parts = line.split("|")
        if len(parts) == 3 and parts[1].strip().isdigit() and not parts[2].startswith("  "):  # top level
            total += int(parts[1])
    return total / 1e6


def bench_imports(device, repeats):
    """Each stage's import time in a fresh interpreter (before) and what a forked stage pays
    to start (after: the warm server has imported them)."""
    from flows import stage_runner

    stage_runner.run_module("json", [], str(REPO), _env(), lambda s: s.read(), lambda s: s.read())
    rows = []
    for stage in STAGES:
        cold = min(import_seconds(f"pipeline.{stage}") for _ in range(max(1, repeats)))
        start = time.perf_counter()
        rc = stage_runner.run_module("bench.import_probe", [f"pipeline.{stage}"], str(REPO), _env(),
                                     lambda s: s.read(), lambda s: s.read()).returncode
        warm = time.perf_counter() - start
        assert rc == 0
        rows.append({"row": f"imports: {stage}", "baseline": "fresh interpreter (-X importtime)",
                     "candidate": "forked warm (start + imports)", "baseline_value": cold, "candidate_value": warm,
                     "unit": "s", "ratio": cold / warm, "reading": f"{cold:.2f} -> {warm:.2f} s",
                     "target": "-", "note": ""})
    return rows
