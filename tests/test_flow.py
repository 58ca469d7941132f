"""The Prefect flow on a real temporary Prefect server (prefect_test_harness)."""
import json
import sys

import pytest
import yaml
from mlflow import MlflowClient
from prefect import flow
from prefect.testing.utilities import prefect_test_harness

from flows.dvc_commands import Stage
from flows.pipeline_flow import StageConfigError, mixmerge_pipeline, run_stage
from tests.conftest import TINY, make_project, run

K = len(TINY["base.shards"])
# DAG order; stages of one generation (federate and the shards) sorted by name
ALL = ["prepare", "pretrain", "federate", *(f"mix_train@{k}" for k in range(K)), "merge", "evaluate"]


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def flow_project(harness, tmp_path_factory):
    root = make_project(tmp_path_factory.mktemp("flow"), TINY)
    summary = mixmerge_pipeline(project_dir=str(root))
    return root, summary


def test_flow_runs_every_stage_in_dag_order(flow_project):
    _, summary = flow_project
    assert summary["ran"] == ALL
    assert summary["skipped"] == []


def test_flow_ends_with_the_same_lock_and_outputs_as_dvc_repro(flow_project, repro_project):
    root, _ = flow_project
    assert yaml.safe_load((root / "dvc.lock").read_text()) == yaml.safe_load((repro_project / "dvc.lock").read_text())
    # byte for byte: same params on CPU give the same metrics file, however the stages ran
    assert (root / "results/metrics.json").read_bytes() == (repro_project / "results/metrics.json").read_bytes()


def test_flow_ran_shards_concurrently_under_one_parent_run(flow_project):
    root, summary = flow_project
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("mixmerge")
    shards = client.search_runs([exp.experiment_id], "tags.`mixmerge.stage` = 'mix_train'")
    assert len(shards) == K
    assert {r.data.tags["mlflow.parentRunId"] for r in shards} == {summary["mlflow_parent_run"]}
    parent = client.get_run(summary["mlflow_parent_run"])
    assert parent.data.tags["mixmerge.orchestrator"] == "prefect" and parent.info.status == "FINISHED"
    # every shard's command started before any other finished: they ran at the same time
    t = [summary["timings"][f"mix_train@{k}"] for k in range(K)]
    assert max(x["started"] for x in t) < min(x["finished"] for x in t)


def test_second_flow_run_skips_up_to_date_stages(flow_project):
    root, _ = flow_project
    summary = mixmerge_pipeline(project_dir=str(root))
    assert summary["ran"] == [] and summary["skipped"] == ALL


def test_flow_reruns_only_what_a_param_change_touches(flow_project):
    root, _ = flow_project
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["merge"]["mergers"]["ties"]["density"] = 0.5
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    summary = mixmerge_pipeline(project_dir=str(root))
    assert summary["ran"] == ["merge", "evaluate"]
    meta = json.loads((root / "results/metrics.json").read_text())
    assert "ties" in meta["test"]


def test_stacked_shards_run_as_one_process_and_are_committed(flow_project):
    root, _ = flow_project
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["mix_train"]["lr"] = 0.03
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    summary = mixmerge_pipeline(project_dir=str(root), stack_shards=True)
    assert summary["ran"] == [*(f"mix_train@{k}" for k in range(K)), "merge", "evaluate"]
    assert list(summary["timings"])[:1] == ["mix_train@" + ",".join(str(k) for k in range(K))], "one process"
    status = run([sys.executable, "-m", "dvc", "status", "--json"], root)
    assert json.loads(status.stdout) == {}, "dvc commit recorded every shard stage"
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("mixmerge")
    stacked = client.search_runs([exp.experiment_id], f"params.stacked_with = '{K}'")
    assert sorted(r.data.params["shard"] for r in stacked) == [str(k) for k in range(K)]
    assert {r.data.tags["mlflow.parentRunId"] for r in stacked} == {summary["mlflow_parent_run"]}


def test_going_back_to_earlier_params_restores_from_the_run_cache_and_runs_nothing(flow_project, repro_project):
    root, _ = flow_project
    first = yaml.safe_load((repro_project / "params.yaml").read_text())  # the first run's params
    changed = yaml.safe_load((repro_project / "params.yaml").read_text())
    changed["merge"]["mergers"]["ties"]["density"] = 0.7
    (root / "params.yaml").write_text(yaml.safe_dump(changed, sort_keys=False))
    assert "merge" in mixmerge_pipeline(project_dir=str(root))["ran"]
    (root / "params.yaml").write_text(yaml.safe_dump(first, sort_keys=False))
    summary = mixmerge_pipeline(project_dir=str(root))
    assert summary["ran"] == []
    assert {"merge", "evaluate"} <= set(summary["restored"])  # (and the shards, after the tests above)
    # what DVC restored is what the first run computed, as `dvc repro` computes it
    assert yaml.safe_load((root / "dvc.lock").read_text()) == yaml.safe_load((repro_project / "dvc.lock").read_text())
    assert (root / "results/metrics.json").read_bytes() == (repro_project / "results/metrics.json").read_bytes()
    status = run([sys.executable, "-m", "dvc", "status", "--json"], root)
    assert json.loads(status.stdout) == {}


@flow
def _one_stage(root: str, stage: Stage):
    return run_stage(root, stage, {})


def test_a_failing_stage_is_retried(harness, tmp_path):
    # fails once, then succeeds (stage commands run without a shell: python, not shell syntax)
    cmd = ("python -c 'import pathlib; p = pathlib.Path(\"attempts\"); "
           "p.write_text((p.read_text() if p.exists() else \"\") + \"x\"); "
           "raise SystemExit(0 if p.read_text().count(\"x\") >= 2 else 1)'")
    _one_stage(str(tmp_path), Stage("flaky", cmd))
    assert (tmp_path / "attempts").read_text().count("x") == 2


def test_stage_commands_never_reach_a_shell(harness, tmp_path):
    # what a shard value like '3; touch x' would make of dvc.yaml's `--shard ${item}`
    with pytest.raises(RuntimeError):  # argparse refuses "3;" (or the module is missing here)
        _one_stage(str(tmp_path), Stage("mix_train@3; touch x", "python -m pipeline.mix_train --shard 3; touch x"))
    assert not (tmp_path / "x").exists()


def test_a_bad_configuration_is_not_retried(harness, tmp_path):
    cmd = ("python -c 'import pathlib, sys; p = pathlib.Path(\"attempts\"); "
           "p.write_text((p.read_text() if p.exists() else \"\") + \"x\"); "
           "print(\"flaky: error: bad key\", file=sys.stderr); raise SystemExit(2)'")
    with pytest.raises(StageConfigError, match="bad key"):
        _one_stage(str(tmp_path), Stage("bad", cmd))
    assert (tmp_path / "attempts").read_text().count("x") == 1


def test_deployment_is_scheduled_and_a_process_worker_runs_it(flow_project):
    """`prefect deploy` with the repository's prefect.yaml, then one run through a real worker."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    root, _ = flow_project
    env = {"PREFECT_API_URL": PREFECT_API_URL.value(), "PWD": str(root)}
    for cmd in (["work-pool", "create", "gpu-pool", "--type", "process"],
                ["--no-prompt", "deploy", "--all"],
                ["deployment", "run", "mixmerge-pipeline/nightly"]):
        proc = run([sys.executable, "-m", "prefect", *cmd], root, **env)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]

    async def deployment_and_runs():
        async with get_client() as client:
            dep = await client.read_deployment_by_name("mixmerge-pipeline/nightly")
            runs = await client.read_flow_runs()
            return dep, [r for r in runs if r.deployment_id == dep.id]

    dep, _ = asyncio.run(deployment_and_runs())
    assert dep.work_pool_name == "gpu-pool"
    assert [s.schedule.cron for s in dep.schedules] == ["0 3 * * *"]
    assert dep.entrypoint == "flows/pipeline_flow.py:mixmerge_pipeline"

    worker = run([sys.executable, "-m", "prefect", "worker", "start", "--pool", "gpu-pool", "--run-once"],
                 root, **env)
    assert worker.returncode == 0, worker.stdout[-2000:] + worker.stderr[-2000:]
    _, runs = asyncio.run(deployment_and_runs())
    manual = [r for r in runs if r.state and r.state.is_final()]
    assert manual and all(r.state.is_completed() for r in manual), [r.state for r in runs]


def test_a_stage_added_to_dvc_yaml_is_run_by_the_flow(flow_project):
    """The flow follows dvc.yaml's graph: a new stage runs, after the one it depends on."""
    root, _ = flow_project
    dvc_yaml = yaml.safe_load((root / "dvc.yaml").read_text())
    dvc_yaml["stages"]["card"] = {
        "cmd": "python -c 'import shutil; shutil.copy(\"results/models.csv\", \"card.txt\")'",
        "deps": ["results/models.csv"], "outs": [{"card.txt": {"cache": False}}]}
    (root / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, sort_keys=False))
    summary = mixmerge_pipeline(project_dir=str(root))
    assert "card" in summary["ran"] and summary["ran"][-1] == "card"
    assert (root / "card.txt").read_text() == (root / "results/models.csv").read_text()


def _prefect_records(flow_run_id: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter,
                                                FlowRunFilterId, LogFilter, LogFilterFlowRunId)

    with get_client(sync_client=True) as client:
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {t.name: t for t in tasks}, logs, artifacts


def test_prefect_streams_stage_output_while_the_stage_runs(flow_project):
    _, summary = flow_project
    tasks, logs, _ = _prefect_records(summary["prefect_flow_run"])
    for name in ("pretrain", "mix_train@0"):
        task = tasks[name]
        lines = [log for log in logs if log.task_run_id == task.id and " epoch " in log.message]
        assert len(lines) >= 2, name
        stamps = sorted(log.timestamp for log in lines)
        # relayed as printed: the epochs' lines carry their own times, all before the stage ended
        # (with the output captured whole, every line carried the time the process exited)
        assert (stamps[-1] - stamps[0]).total_seconds() > 0.01, name
        assert stamps[-1] <= task.end_time, name
    assert not [t for t in tasks if t.startswith(("stale_stages", "commit_stages"))], "bookkeeping is not a task"


def test_prefect_task_graph_has_the_dvc_dependencies(flow_project):
    _, summary = flow_project
    tasks, _, _ = _prefect_records(summary["prefect_flow_run"])
    by_id = {t.id: name for name, t in tasks.items()}

    def upstream(name):
        return {by_id[ref.id] for ref in tasks[name].task_inputs.get("wait_for", [])}

    assert upstream("prepare") == set()
    assert upstream("pretrain") == {"prepare"}
    assert upstream("mix_train@0") == {"prepare", "pretrain"}
    assert upstream("merge") == {"prepare", "pretrain", *(f"mix_train@{k}" for k in range(K))}
    assert upstream("evaluate") == {"prepare", "pretrain", "merge", "federate", *(f"mix_train@{k}" for k in range(K))}


def test_prefect_artifact_links_every_model_to_its_mlflow_run(flow_project):
    root, summary = flow_project
    _, _, artifacts = _prefect_records(summary["prefect_flow_run"])
    (artifact,) = [a for a in artifacts if a.key == "mixmerge-results"]
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    exp = client.get_experiment_by_name("mixmerge").experiment_id
    evaluated = client.search_runs([exp], f"tags.`mixmerge.pipeline_run` = '{summary['mlflow_parent_run']}' and "
                                          f"tags.`mixmerge.role` = 'evaluation'", max_results=100)
    models = (root / "results/models.csv").read_text().splitlines()[1:]
    assert len(evaluated) == len(models)
    for r in evaluated:
        assert f"[{r.data.tags['mixmerge.model']}](http://127.0.0.1:5000/#/experiments/{exp}/runs/{r.info.run_id})" \
            in artifact.data
    parent = client.get_run(summary["mlflow_parent_run"])
    assert parent.data.tags["mixmerge.prefect_flow_run_id"] == summary["prefect_flow_run"]
    assert summary["prefect_flow_run"] in parent.data.tags["mlflow.note.content"]


def test_a_flow_waits_for_another_flow_in_the_same_project(flow_project, monkeypatch):
    from flows.project_lock import ProjectBusy
    from tests.test_faults import _holder

    root, _ = flow_project
    holder = _holder("import time; from pathlib import Path; from flows.project_lock import project_lock\n"
                     f"with project_lock(Path({str(root)!r})):\n    print('held', flush=True); time.sleep(600)", root)
    monkeypatch.setenv("MIXMERGE_FLOW_WAIT_S", "1")
    try:
        with pytest.raises(ProjectBusy, match=f"pid {holder.pid}"):
            mixmerge_pipeline(project_dir=str(root))
    finally:
        holder.kill()
        holder.wait()
