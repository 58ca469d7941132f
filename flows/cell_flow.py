"""One sweep cell as a Prefect flow run on a work pool: whichever worker is free takes it.

The sweep driver (`python -m flows.sweep --pool POOL`) creates one flow run of the deployment
`mixmerge-sweep-cell/cells` per cell, with the cell's params as a parameter. On the worker
that takes it, the cell runs in the worker's own checkout, in MIXMERGE_DATA_DIR/<grid>/<cell>,
exactly as a local sweep runs it (flows.sweep_cell). Its record goes to the MLflow server:
a parent run per attempt, tagged with the cell and the Prefect flow run, holding the cell's
results (results/metrics.json, rounds.csv) as artifacts, from which the driver builds the
summary. Its DVC outputs and run-cache entries go to the shared remote (MIXMERGE_DVC_REMOTE)
when one is set, so a stage computed on one machine is restored, not recomputed, on another.

The deployment's entrypoint is a module path, so each worker imports this module from its
own checkout (PYTHONPATH, set by flows.worker); no code is shipped through the server.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

from prefect import flow, get_run_logger

REPO = Path(__file__).resolve().parents[1]
FLOW_NAME = "mixmerge-sweep-cell"
DEPLOYMENT = "cells"
ENTRYPOINT = "flows.cell_flow.sweep_cell_flow"
STAGE_FLOW_NAME = "mixmerge-stage"
STAGE_DEPLOYMENT = "stages"
STAGE_ENTRYPOINT = "flows.cell_flow.project_stage_flow"
EXIT_BAD_CONFIG = 2


def params_digest(params: dict) -> str:
    """What identifies a cell's configuration in the record, whichever machine ran it."""
    return hashlib.sha256(yaml.safe_dump(params, sort_keys=True).encode()).hexdigest()[:16]


def data_dir() -> Path:
    return Path(os.environ.get("MIXMERGE_DATA_DIR") or REPO / "sweeps")


@flow(name=FLOW_NAME, flow_run_name="{grid}/{name}", log_prints=True)
def sweep_cell_flow(grid: str, name: str, params: dict, experiment: str) -> dict:
    """Run one cell of ``grid`` with ``params`` on this worker; record it in ``experiment``."""
    import mlflow
    from mlflow.entities import Metric
    from prefect.runtime import flow_run

    from flows.sweep import CellFolderInUse, prepare_cell
    from pipeline.io.tracking import ensure_experiment

    logger = get_run_logger()
    cell_dir = data_dir() / grid / name
    try:
        prepare_cell(cell_dir, params)  # an earlier attempt's folder with these params is resumed
    except CellFolderInUse as e:
        raise ValueError(str(e)) from None
    client = mlflow.MlflowClient()
    exp_id = ensure_experiment(client, REPO, experiment)
    worker = os.environ.get("PREFECT__WORKER_NAME", "")
    parent = client.create_run(exp_id, run_name=name, tags={
        "mixmerge.role": "pipeline", "mixmerge.sweep": grid, "mixmerge.cell": name,
        "mixmerge.params_digest": params_digest(params), "mixmerge.prefect_flow_run_id": str(flow_run.id),
        "mixmerge.worker": worker, "mixmerge.host": socket.gethostname()}).info.run_id
    logger.info(f"cell {name} in {cell_dir} on {worker or socket.gethostname()}; MLflow run {parent}")
    env = {**os.environ, "MIXMERGE_EXPERIMENT": experiment, "MIXMERGE_PARENT_RUN_ID": parent, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    started = time.perf_counter()
    try:
        _run_cell(cell_dir, env, logger)
    except Exception:
        client.set_terminated(parent, "FAILED")
        raise
    cell_seconds = time.perf_counter() - started  # the pipeline itself; the rest of the flow run is orchestration
    results = cell_dir / "results"
    for f in ("metrics.json", "rounds.csv"):
        if (results / f).exists():
            client.log_artifact(parent, str(results / f), artifact_path="results")
    started = time.perf_counter()
    pushed = push_outputs(cell_dir)
    client.log_batch(parent, metrics=[Metric("cell_seconds", cell_seconds, int(time.time() * 1000), 0),
                                      Metric("dvc_push_seconds", time.perf_counter() - started, int(time.time() * 1000), 0)])
    stages = json.loads((cell_dir / "stages.json").read_text())
    for key, value in {"mixmerge.dvc_pushed": str(pushed), "mixmerge.stages_ran": ",".join(stages["ran"]),
                       "mixmerge.stages_restored": ",".join(stages["restored"])}.items():
        client.set_tag(parent, key, value)
    client.set_terminated(parent, "FINISHED")
    return {"cell": name, "mlflow_run": parent, "worker": worker, "dvc_pushed": pushed}


def _run_cell(cell_dir: Path, env: dict[str, str], logger, *args: str) -> None:
    """`python -m flows.sweep_cell CELL_DIR [ARGS]`, its output streamed to the flow run's log
    while it runs and kept in the cell's log.txt."""
    with open(cell_dir / "log.txt", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "flows.sweep_cell", str(cell_dir), *args], cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            log.write(line)
            logger.info(line.rstrip())
        returncode = proc.wait()
    if returncode != 0:
        kind = ValueError if returncode == EXIT_BAD_CONFIG else RuntimeError
        raise kind(f"{cell_dir.name}: exited with {returncode} (see {cell_dir}/log.txt on {socket.gethostname()})")


@flow(name=STAGE_FLOW_NAME, flow_run_name="{stage}", log_prints=True)
def project_stage_flow(params_yaml: str, stage: str, experiment: str, parent_run: str) -> dict:
    """One stage of a pipeline run that another machine orchestrates (the flow's
    ``--shards-on-pool``): in a folder of this worker keyed by the params, restore what the stage
    needs from the shared remote's run cache (the orchestrator pushed it), run the stage, and
    push its outputs and run-cache entry back, from which the orchestrator restores it. The
    stage's MLflow run nests under the orchestrator's parent run."""
    logger = get_run_logger()
    folder = data_dir() / "projects" / hashlib.sha256(params_yaml.encode()).hexdigest()[:16]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.yaml").write_text(params_yaml)
    env = {**os.environ, "MIXMERGE_EXPERIMENT": experiment, "MIXMERGE_PARENT_RUN_ID": parent_run,
           "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    _run_cell(folder, env, logger, "--target", stage)
    pushed = push_outputs(folder)
    stages = json.loads((folder / "stages.json").read_text())
    return {"stage": stage, "worker": os.environ.get("PREFECT__WORKER_NAME", ""), "ran": stages["ran"],
            "restored": stages["restored"], "dvc_pushed": pushed}


def push_outputs(cell_dir: Path) -> int:
    """The cell's outputs and run-cache entries to the shared DVC remote, if one is set
    (MIXMERGE_DVC_REMOTE): flows.sweep_cell has recorded them (dvc.lock, cache, run cache) as
    `dvc repro` would, so another machine restores these stages instead of computing them, or
    `dvc pull`s the cell. Returns the number of files pushed (0 without a remote)."""
    if not os.environ.get("MIXMERGE_DVC_REMOTE"):
        return 0
    out = subprocess.run([sys.executable, "-m", "dvc", "push", "--run-cache"], cwd=cell_dir, capture_output=True,
                         text=True)
    if out.returncode != 0:
        raise RuntimeError(f"dvc push in {cell_dir} failed: {(out.stderr or out.stdout).strip()[-500:]}")
    last = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
    return int(last.split()[0]) if last[:1].isdigit() else 0


def ensure_deployment(work_pool: str, flow_name: str = FLOW_NAME) -> str:
    """The deployment a sweep cell's (or, with ``STAGE_FLOW_NAME``, a remote stage's) flow runs
    are made from (created or updated; idempotent)."""
    from prefect.client.orchestration import get_client

    name, entrypoint, what = {
        FLOW_NAME: (DEPLOYMENT, ENTRYPOINT, "One mixmerge sweep cell; submitted by python -m flows.sweep --pool"),
        STAGE_FLOW_NAME: (STAGE_DEPLOYMENT, STAGE_ENTRYPOINT,
                          "One stage of a mixmerge pipeline run; submitted by python -m flows.pipeline_flow "
                          "--shards-on-pool"),
    }[flow_name]
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow_from_name(flow_name)
        return str(client.create_deployment(flow_id=flow_id, name=name, entrypoint=entrypoint, work_pool_name=work_pool,
                                            enforce_parameter_schema=False, description=what))

