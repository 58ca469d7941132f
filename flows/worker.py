"""A Prefect process worker on this machine's checkout, taking sweep cells from the work pool.

    python -m flows.worker [--name gpu0] [--limit 1] [--data-dir sweeps]

Reads PREFECT_API_URL, MLFLOW_TRACKING_URI, MIXMERGE_WORK_POOL and MIXMERGE_DVC_REMOTE from the
environment (`python -m flows.cluster env` on the coordinating machine prints them). One
worker per GPU, each with --limit 1 (one GPU job at a time) and CUDA_VISIBLE_DEVICES set to
its GPU, is the intended shape: a flow run's stages see one device, as on a one-GPU machine.

Each flow run is a fresh `python -m prefect.engine` process started by the worker, with this
checkout on PYTHONPATH so the cell's code is this checkout's. Heartbeats every 30 s (the
minimum Prefect allows) let the server mark a run whose worker died as Crashed (the automation
`flows.cluster up` creates), and the sweep driver then runs that cell again.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEARTBEAT_S = 30
QUERY_S = 2


def worker_command(name: str, limit: int, pool: str) -> list[str]:
    return [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type", "process",
            "--name", name, "--limit", str(limit)]


def worker_environment(data_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["MIXMERGE_DATA_DIR"] = str(data_dir.resolve())
    env.setdefault("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", str(HEARTBEAT_S))
    # how often the worker asks for work: Prefect's 10 s left a cell waiting 5 s on average
    # before a free worker took it; one small query every 2 s costs the server nothing it notices
    env.setdefault("PREFECT_WORKER_QUERY_SECONDS", str(QUERY_S))
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    env.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    return env


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flows.worker", description=__doc__.split("\n\n")[0])
    p.add_argument("--name", default=f"{socket.gethostname()}-{os.getpid()}")
    p.add_argument("--limit", type=int, default=1, help="flow runs at once (one per GPU it may use)")
    p.add_argument("--data-dir", default=str(REPO / "sweeps"), help="where the cells' folders go")
    args = p.parse_args(argv)
    missing = [k for k in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "MIXMERGE_WORK_POOL") if not os.environ.get(k)]
    if missing:
        print(f"error: {', '.join(missing)} not set (eval \"$(python -m flows.cluster env)\" on the coordinating "
              "machine prints them)", file=sys.stderr)
        return 2
    if args.limit < 1:
        print(f"error: --limit must be at least 1, got {args.limit}", file=sys.stderr)
        return 2
    Path(args.data_dir).mkdir(parents=True, exist_ok=True)
    command = worker_command(args.name, args.limit, os.environ["MIXMERGE_WORK_POOL"])
    print(f"worker {args.name}: pool {os.environ['MIXMERGE_WORK_POOL']}, at most {args.limit} at once, "
          f"cells in {Path(args.data_dir).resolve()}", flush=True)
    os.execve(command[0], command, worker_environment(Path(args.data_dir)))  # the worker is this process


if __name__ == "__main__":
    sys.exit(main())
