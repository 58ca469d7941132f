"""The mixmerge pipeline as a Prefect flow.

DVC owns the DAG and the cache, Prefect the scheduling, concurrency and retries, MLflow the
record. For each generation of DVC's stage graph the flow asks `dvc status` which stages
are stale and runs their commands concurrently as Prefect tasks (the K mix_train shards run
at once; `dvc repro` would run them one by one and its repository lock forbids two repro
processes). After each generation one `dvc commit` records the stages that ran in it, so a flow
killed later keeps what finished. The result is the same outputs and dvc.lock as `dvc repro`.

Run: python -m flows.pipeline_flow [--stack-shards]   (a Prefect server of its own starts if none is set)
"""
from __future__ import annotations

import contextvars
import hashlib
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

# Before Prefect loads its settings: the temporary server's telemetry heartbeat writes to the
# same SQLite file as the flow and prints a "database is locked" traceback that is not ours;
# MLflow's table-creation chatter is not the user's business either.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
from pipeline.runtime.tracking_env import bounded_tracking_waits  # noqa: E402

bounded_tracking_waits()  # a tracking server that is down fails the flow in seconds, in one line

from prefect import flow, get_run_logger, task
from prefect.task_runners import ThreadPoolTaskRunner

from flows import dvc_commands as dvc
from flows import stage_runner
from flows.local_server import die_with_parent
from flows.project_lock import ProjectBusy, project_lock

EXIT_BAD_CONFIG = 2


class StageConfigError(RuntimeError):
    """A stage refused its configuration (exit 2): retrying cannot help."""


class StageInterrupted(RuntimeError):
    """The stage was stopped by SIGINT or SIGTERM (Ctrl-C in the terminal reaches the whole
    process group): the user wants the run to stop, not to be retried."""


def _retry_unless_bad_config(task, task_run, state) -> bool:
    exc = state.result(raise_on_failure=False)
    return not isinstance(exc, (StageConfigError, StageInterrupted))


@task(retries=2, retry_delay_seconds=2, retry_condition_fn=_retry_unless_bad_config,
      task_run_name="{stage.name}")
def run_stage(root: str, stage: dvc.Stage, env_extra: dict[str, str]) -> dict[str, float]:
    """Run one DVC stage's command, its output streamed to the Prefect log line by line while
    it runs (stdout as info, stderr as warnings). Returns wall-clock start and end (epoch
    seconds) of the command."""
    logger = get_run_logger()
    start = time.time()
    # Split as a shell would, run without one: no parameter that reaches a command (dvc.yaml's
    # ${item}) can become shell syntax.
    # The stage dies with the flow (parent-death signal): a killed flow leaves no stage running on.
    stderr_tail: deque[str] = deque(maxlen=1)
    held: list[str] = []  # a traceback, logged whole once we know the stage was not interrupted
    relay_out = lambda stream: _relay(stream, logger.info, deque(maxlen=1))  # noqa: E731
    relay_err = lambda stream: _relay(stream, logger.warning, stderr_tail, held)  # noqa: E731
    module = dvc.python_module(stage, strict=False) if stage_runner.warm() else None
    if module is not None:  # forked from a process that has torch and MLflow imported already
        returncode = stage_runner.run_module(*module, root, dvc.stage_env(env_extra), relay_out, relay_err).returncode
    else:
        proc = subprocess.Popen(shlex.split(stage.cmd), cwd=root, env=dvc.stage_env(env_extra), text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=1, preexec_fn=die_with_parent)
        # in a copy of this context: Prefect's run context and API settings are context variables
        relay_stderr = threading.Thread(target=contextvars.copy_context().run, args=(relay_err, proc.stderr), daemon=True)
        relay_stderr.start()
        relay_out(proc.stdout)
        relay_stderr.join()
        returncode = proc.wait()
    if returncode in (-signal.SIGINT, -signal.SIGTERM, 128 + signal.SIGINT, 128 + signal.SIGTERM):
        # Ctrl-C: the stage's KeyboardInterrupt traceback says nothing the user does not know
        raise StageInterrupted(f"{stage.name}: interrupted (signal); the stages that finished are recorded")
    if held:
        logger.error("\n".join(held))
    if returncode == EXIT_BAD_CONFIG:
        raise StageConfigError(f"{stage.name}: bad configuration: {stderr_tail[-1] if stderr_tail else ''}")
    if returncode != 0:
        raise RuntimeError(f"{stage.name}: `{stage.cmd}` exited with {returncode}")
    return {"started": start, "finished": time.time()}


POOL_ATTEMPTS = 3  # a stage whose worker died (its flow run Crashed) is sent again, at most this many times


@task(task_run_name="{stage.name} on pool {pool}")
def run_stage_on_pool(root: str, stage: dvc.Stage, pool: str, env_extra: dict[str, str]) -> dict[str, float]:
    """Run one stage on whichever worker of ``pool`` is free, as a flow run of the deployment
    `mixmerge-stage/stages` (flows.cell_flow.project_stage_flow, shown here as a subflow run). The
    worker restores what the stage needs from the shared remote and pushes what it computed;
    the flow restores it from there after the generation. Returns start and end (epoch s)."""
    from prefect.deployments import run_deployment

    from flows.cell_flow import STAGE_DEPLOYMENT, STAGE_FLOW_NAME

    logger = get_run_logger()
    start = time.time()
    for attempt in range(1, POOL_ATTEMPTS + 1):
        run = run_deployment(f"{STAGE_FLOW_NAME}/{STAGE_DEPLOYMENT}", timeout=None, parameters={
            "params_yaml": (Path(root) / "params.yaml").read_text(), "stage": stage.name,
            "experiment": os.environ.get("MIXMERGE_EXPERIMENT", "mixmerge"),
            "parent_run": env_extra["MIXMERGE_PARENT_RUN_ID"]})
        if run.state.is_completed():
            return {"started": start, "finished": time.time()}
        if not run.state.is_crashed() or attempt == POOL_ATTEMPTS:
            raise RuntimeError(f"{stage.name} on pool {pool}: flow run {run.name} ended {run.state.name}: "
                               f"{run.state.message}")
        logger.warning(f"{stage.name}: flow run {run.name} crashed ({run.state.message}); sending it again")
    raise AssertionError("unreachable")


def _share_with_pool(root: Path, pool: str, logger) -> None:
    """Before a generation's stages go to the pool: the deployment exists, and everything this
    project computed so far is on the shared remote with its run-cache entries, so a worker
    restores the stages' inputs instead of computing them."""
    from flows.cell_flow import STAGE_FLOW_NAME, ensure_deployment

    if not dvc.has_default_remote(root):
        remote = os.environ.get("MIXMERGE_DVC_REMOTE")
        if not remote:
            raise StageConfigError("stages on a work pool need a DVC remote the workers reach: set "
                                   "MIXMERGE_DVC_REMOTE or `dvc remote add -d NAME URL`")
        out = dvc.dvc(root, "remote", "add", "--local", "--force", "--default", "shared", remote)
        if out.returncode != 0:
            raise RuntimeError(f"dvc remote add failed: {out.stderr.strip()}")
    ensure_deployment(pool, STAGE_FLOW_NAME)
    out = dvc.dvc(root, "push", "--run-cache")
    if out.returncode != 0:
        raise RuntimeError(f"dvc push --run-cache failed: {out.stderr.strip()[-500:]}")
    logger.info(f"pushed this project's outputs and run cache for the workers of pool {pool}")


def _relay(stream, log, tail: deque, held: list[str] | None = None) -> None:
    """Log each line of a stage's output as it arrives. With ``held``, a Python traceback is
    kept back from its first line on (the caller logs it as one message, or drops it when the
    stage was interrupted)."""
    for line in iter(stream.readline, ""):
        line = line.rstrip("\n")
        if not line.strip():
            continue
        tail.append(line)
        if held is not None and (held or line.startswith("Traceback (most recent call last)")):
            held.append(line)
        else:
            log(line)


def _start_parent_run(root: Path) -> tuple[object, str]:
    """One MLflow parent run for this flow run; stage runs attach to it as children."""
    from mlflow import MlflowClient

    from pipeline.io.tracking import ensure_experiment, git_commit, start_pipeline_run, tracking_uri

    client = MlflowClient(tracking_uri(root))
    commit = git_commit(root)
    params = (root / "params.yaml").read_bytes()
    key = hashlib.sha256(commit.encode() + b"\0" + params).hexdigest()[:16]
    experiment = ensure_experiment(client, root)
    _close_orphaned_parents(client, experiment)
    run = start_pipeline_run(client, experiment, key,
                             {"mixmerge.git_commit": commit, "mixmerge.orchestrator": "prefect",
                              "mixmerge.flow_host": socket.gethostname(), "mixmerge.flow_pid": str(os.getpid())})
    return client, run.info.run_id


def _open_tracking_store(root: Path) -> None:
    """Open (and on a fresh project create) the MLflow store and experiment ahead of the flow.
    A failure here is left to the flow, which reports it in one line when it opens its run."""
    from pipeline.io.tracking import ensure_experiment, tracking_uri

    uri = tracking_uri(root)
    if not uri.startswith("sqlite:"):  # a server: nothing to create here, and an outage would be waited for twice
        return
    try:
        from mlflow import MlflowClient

        ensure_experiment(MlflowClient(uri), root)
    except Exception:  # noqa: BLE001
        pass


def _close_orphaned_parents(client, experiment: str) -> None:
    """A flow killed with SIGKILL cannot mark its parent run: the next flow on the same machine
    marks as KILLED every parent run still RUNNING whose flow process no longer exists."""
    running = client.search_runs(
        [experiment], max_results=1000,
        filter_string=(f"tags.`mixmerge.role` = 'pipeline' and attributes.status = 'RUNNING' "
                       f"and tags.`mixmerge.flow_host` = '{socket.gethostname()}'"))
    for r in running:
        pid = int(r.data.tags.get("mixmerge.flow_pid", "0") or 0)
        try:
            os.kill(pid, 0)  # signal 0: does the process exist?
            alive = pid > 0
        except ProcessLookupError:
            alive = False
        except PermissionError:  # exists, another user's
            alive = True
        if not alive:
            client.set_terminated(r.info.run_id, "KILLED")


def _link_flow_run(client, parent: str) -> None:
    """The MLflow parent run names the Prefect flow run that made it (tags, and a link in its
    description)."""
    from prefect.runtime import flow_run

    url = flow_run.ui_url
    tags = {"mixmerge.prefect_flow_run_id": str(flow_run.id), "mixmerge.prefect_flow_run": str(flow_run.name)}
    if url:
        tags["mixmerge.prefect_flow_run_url"] = url
    what = f"[{flow_run.name}]({url})" if url else f"`{flow_run.name}` (id `{flow_run.id}`)"
    tags["mlflow.note.content"] = (f"Orchestrated by the Prefect flow run {what}. The stages' runs are nested "
                                   f"below; evaluate's nested runs hold one model each, with the same metric keys.")
    for key, value in tags.items():
        client.set_tag(parent, key, value)


def _publish_results(root: Path, client, parent: str, ran: list[str]) -> None:
    """The results table as a Prefect artifact of this flow run, each model linked to its
    MLflow run (when evaluate ran in this flow; otherwise the table on disk, unlinked)."""
    import csv

    from prefect.artifacts import create_markdown_artifact

    from pipeline.io import layout
    from pipeline.io.tracking import ui_base

    table = root / layout.MODELS_CSV
    if not table.exists():
        return
    with table.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    links, ui = {}, ui_base(client.tracking_uri)
    exp = client.get_run(parent).info.experiment_id
    if "evaluate" in ran:  # evaluate's per-model runs, tagged with this pipeline run
        for r in client.search_runs([exp], max_results=1000, filter_string=(
                f"tags.`mixmerge.role` = 'evaluation' and tags.`mixmerge.pipeline_run` = '{parent}'")):
            links[r.data.tags.get("mixmerge.model")] = f"{ui}/#/experiments/{exp}/runs/{r.info.run_id}"
    columns = ["model", "kind", "accuracy", "nll", "ece", "probe_accuracy", "knn_accuracy"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        name = f"[{row['model']}]({links[row['model']]})" if row["model"] in links else row["model"]
        lines.append("| " + " | ".join([name] + [row[c] for c in columns[1:]]) + " |")
    header = (f"Test scores of every model (`{layout.MODELS_CSV}`). MLflow: [pipeline run]"
              f"({ui}/#/experiments/{exp}/runs/{parent})"
              + ("" if "evaluate" in ran else "; evaluate was up to date, so the models link to no run of this flow"))
    create_markdown_artifact(key="mixmerge-results", markdown=header + "\n\n" + "\n".join(lines),
                             description="mixmerge: every model side by side")


@flow(name="mixmerge-pipeline", task_runner=ThreadPoolTaskRunner(max_workers=16), log_prints=True)
def mixmerge_pipeline(project_dir: str = ".", stack_shards: bool = False, shards_on_pool: str | None = None) -> dict:
    """Bring every DVC stage of the project up to date; returns what ran and what was skipped.

    ``stack_shards``: train all stale mix_train shards in one process, stacked and vmapped,
    instead of one process each. Faster (no K-fold import and load cost), and equal to the
    one-by-one result within float tolerance, but not byte for byte: leave it off when the
    flow must write exactly what `dvc repro` writes.

    ``shards_on_pool``: train each stale mix_train shard on a free worker of this Prefect work
    pool instead (see run_stage_on_pool); the experts reach this machine through the DVC remote.
    """
    logger = get_run_logger()
    root = Path(project_dir).resolve()
    if stack_shards and shards_on_pool:
        raise StageConfigError("choose stack_shards or shards_on_pool, not both")
    with project_lock(root, say=logger.warning):  # a second flow here waits for this one
        return _bring_up_to_date(root, stack_shards, logger, shards_on_pool)


def _bring_up_to_date(root: Path, stack_shards: bool, logger, pool: str | None = None) -> dict:
    try:
        client, parent = _start_parent_run(root)
    except Exception as e:  # noqa: BLE001  (MLflow, requests and SQLAlchemy errors alike)
        from pipeline.io.tracking import tracking_uri

        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise RuntimeError(f"tracking store {tracking_uri(root)} is unreachable or unusable: {first}") from None
    _link_flow_run(client, parent)
    env = {"MIXMERGE_PARENT_RUN_ID": parent}
    ran, skipped, restored, timings = [], [], [], {}
    uncommitted: list[str] = []
    error: BaseException | None = None
    try:
        generations, upstream = dvc.graph(root)
        # outputs computed before, here or (through the default remote) on another machine
        may_restore, pull = dvc.run_cache_sources(root)
        by_stage = {}  # stage name -> the future that ran it: the task graph's edges
        for layer in generations:
            names = [s.name for s in layer]
            todo = set(dvc.stale(root, names))
            skipped += [n for n in names if n not in todo]
            if todo and may_restore:  # computed before with this code, params and inputs: DVC's run cache has it
                back = dvc.restore_from_run_cache(root, sorted(todo), pull=pull)
                if back:
                    logger.info(f"restored from DVC's run cache, not run: {back}")
                restored += back
                todo -= set(back)
            units = [[s] for s in layer if s.name in todo]
            if stack_shards:
                units = dvc.stacked_shard_units(units)
            remote = {s.name for u in units for s in u if pool and s.name.startswith(dvc.SHARD_STAGE)}
            if remote:
                _share_with_pool(root, pool, logger)
            futures = {}
            for unit in units:
                command = dvc.unit_command(unit)
                after = [by_stage[u] for u in sorted({u for s in unit for u in upstream[s.name] if u in by_stage})]
                if command.name in remote:
                    fut = run_stage_on_pool.submit(str(root), command, pool, env, wait_for=after)
                else:
                    fut = run_stage.submit(str(root), command, env, wait_for=after)
                futures[command.name] = (unit, fut)
                by_stage.update({s.name: fut for s in unit})
            failed = []
            for name, (unit, fut) in futures.items():
                fut.wait()
                if fut.state.is_completed():
                    ran += [s.name for s in unit]
                    if name not in remote:
                        uncommitted += [s.name for s in unit]
                    timings[name] = fut.result()
                else:
                    failed.append(name)
            done_remotely = sorted(n for n in remote if n not in failed)
            if done_remotely:  # what the workers pushed: outputs, dvc.lock entries, as if run here
                back = dvc.restore_from_run_cache(root, done_remotely, pull=True)
                if sorted(back) != done_remotely:
                    raise RuntimeError(
                        f"{', '.join(sorted(set(done_remotely) - set(back)))} ran on pool {pool} but cannot be restored "
                        "here: is every worker's checkout at this checkout's commit (same code, same dvc.yaml)?")
            if uncommitted and not failed:
                # Recorded now, not at the end: a flow killed in a later generation keeps this
                # one's work (dvc.lock and the cache), as `dvc repro` keeps each finished stage.
                dvc.commit(root, uncommitted)
                uncommitted = []
            if failed:
                errors = [futures[name][1].state.result(raise_on_failure=False) for name in failed]
                if any(isinstance(e, StageInterrupted) for e in errors):
                    # Ctrl-C reached the stages; when it reaches this thread only after they
                    # stopped (a signal can land on another thread), it is still an interrupt
                    raise KeyboardInterrupt("a stage was interrupted")
                futures[failed[0]][1].result()  # re-raise the first failure
            if todo:
                logger.info(f"ran {sorted(todo)}; up to date: {[n for n in names if n not in todo]}")
    except BaseException as e:
        error = e
        raise
    finally:
        # What finished beside a failure is recorded too. A failing commit here must not hide
        # the error that got us here: it is logged, and the original one propagates.
        try:
            if uncommitted:
                dvc.commit(root, uncommitted)
        except Exception as commit_error:  # noqa: BLE001
            if error is None:
                raise
            logger.error(f"dvc commit of {uncommitted} failed as well: {commit_error}")
        finally:
            client.set_terminated(parent, "FAILED" if error is not None else "FINISHED")
    _publish_results(root, client, parent, ran)
    from prefect.runtime import flow_run

    return {"ran": ran, "skipped": skipped, "restored": restored, "timings": timings, "mlflow_parent_run": parent,
            "prefect_flow_run": str(flow_run.id)}


if __name__ == "__main__":
    import argparse

    cli = argparse.ArgumentParser(prog="python -m flows.pipeline_flow", description=__doc__.split("\n\n")[0])
    cli.add_argument("--project-dir", default=".")
    cli.add_argument("--stack-shards", action="store_true",
                     help="train all stale shards in one stacked process (equal within float tolerance)")
    cli.add_argument("--shards-on-pool", default=None, metavar="POOL",
                     help="train each stale shard on a free worker of this Prefect work pool (see README: "
                          "Several GPU machines)")
    args = cli.parse_args()
    from flows.local_server import prefect_api

    if stage_runner.warm():
        stage_runner.prewarm()  # its imports overlap the Prefect server's start
    store = threading.Thread(target=_open_tracking_store, args=(Path(args.project_dir).resolve(),), daemon=True)
    store.start()  # so does opening the MLflow store (creating a fresh one's tables takes seconds)
    try:
        with prefect_api():  # a server of this run's own when PREFECT_API_URL is not set
            store.join()
            summary = mixmerge_pipeline(project_dir=args.project_dir, stack_shards=args.stack_shards,
                                        shards_on_pool=args.shards_on_pool)
    except KeyboardInterrupt:  # Ctrl-C: the stages got it too and stopped; the server is stopped
        print("interrupted: the stages that finished are recorded in dvc.lock", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
    except ProjectBusy as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(75)  # EX_TEMPFAIL: try again later
    print(f"ran: {', '.join(summary['ran']) or 'nothing'}; restored from DVC's run cache: "
          f"{', '.join(summary['restored']) or 'nothing'}; up to date: {', '.join(summary['skipped']) or 'nothing'}")
    sys.exit(0)
