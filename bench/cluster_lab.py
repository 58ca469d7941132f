"""Several machines in miniature, on loopback: the servers of `python -m flows.cluster up` and
Prefect workers in separate checkouts with separate data folders. Used by tests/test_cluster.py
and by the `pool` row of `python -m bench` (sweep cells per hour, one worker against two).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A free port below the kernel's ephemeral range: a port the kernel hands out (bind to 0)
    can be taken again, before the server binds it, as the source port of any outgoing
    connection (seen: MLflow's port taken between two labs)."""
    import random

    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except OSError:
        low = 32768
    for _ in range(200):
        port = random.randrange(10000, low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port below the ephemeral range")


def checkout(dest: Path) -> Path:
    """A second checkout of this working tree (tracked and untracked files, not ignored ones),
    as a second machine's clone would be."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        if (REPO / rel).is_file() and not rel.startswith(("results/", "data/", "sweeps/")) and rel != "dvc.lock":
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dest / rel)
    return dest


def descendants(pid: int) -> list[int]:
    """The process and every process under it (Prefect starts flow runs in sessions of their
    own, so a process group does not reach them)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def kill_tree(pid: int) -> None:
    """SIGKILL a process and everything under it, as a machine that loses power would."""
    for p in descendants(pid):
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def lab_root() -> Path:
    """A folder for the lab. Run as root, PostgreSQL runs as the postgres user, which must be
    able to enter it: a world-enterable folder under /tmp."""
    root = Path(tempfile.mkdtemp(prefix="mixmerge-lab-", dir="/tmp"))
    root.chmod(0o755)
    return root


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "MIXMERGE_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


class Lab:
    """The cluster servers in ``root``/cluster, and workers started on request."""

    def __init__(self, root: Path, up_args: tuple[str, ...] = (), outside_env: dict[str, str] | None = None):
        """``up_args``: more flags for `flows.cluster up`; ``outside_env``: variables every server,
        worker and driver gets (an S3 endpoint's credentials)."""
        self.root = root
        self.dir = root / "cluster"
        self.ports = {"--postgres-port": free_port(), "--prefect-port": free_port(), "--mlflow-port": free_port()}
        self.up_args = list(up_args)
        self.outside_env = dict(outside_env or {})
        self.workers: dict[str, subprocess.Popen] = {}
        self.env: dict[str, str] = {}

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        extra = [a for kv in self.ports.items() for a in map(str, kv)] + self.up_args if args[0] == "up" else []
        return subprocess.run([sys.executable, "-m", "flows.cluster", *args, "--dir", str(self.dir), *extra],
                              cwd=REPO, env=base_env(**self.outside_env), capture_output=True, text=True, timeout=300)

    def up(self) -> None:
        proc = self.cli("up")
        if proc.returncode != 0:
            raise RuntimeError(f"cluster up failed: {proc.stdout}{proc.stderr}")
        lines = self.cli("env").stdout.split()
        self.env = {**self.outside_env, **dict(line.split("=", 1) for line in lines if "=" in line)}

    def start_worker(self, name: str) -> Path:
        where = checkout(self.root / name)
        log = open(self.root / f"{name}.log", "w")
        self.workers[name] = subprocess.Popen(
            [sys.executable, "-m", "flows.worker", "--name", name, "--data-dir", str(where / "sweeps")],
            cwd=where, env=base_env(**self.env, PYTHONPATH=str(where)),
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return where

    def stop_worker(self, name: str) -> None:
        proc = self.workers.pop(name)
        kill_tree(proc.pid)
        proc.wait()

    def sweep(self, *args: str, timeout: float = 540) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "flows.sweep", "--grid", "smoke", *args], cwd=REPO,
                              env=base_env(**self.env), capture_output=True, text=True, timeout=timeout)

    def mlflow(self):
        import mlflow

        return mlflow.MlflowClient(self.env["MLFLOW_TRACKING_URI"])

    def server_memory_mb(self) -> dict[str, float]:
        """Memory of each server with every process under it (PostgreSQL's backends, the
        servers' workers), as proportional set size: shared pages counted once."""
        import json

        state = json.loads((self.dir / "cluster.json").read_text())
        postmaster = int((self.dir / "postgres" / "postmaster.pid").read_text().split()[0])
        out = {}
        for name, pid in (("PostgreSQL", postmaster), ("Prefect", state["prefect_pid"]), ("MLflow", state["mlflow_pid"])):
            kb = 0
            for p in descendants(pid):
                try:
                    kb += int(next(line for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines()
                                   if line.startswith("Pss:")).split()[1])
                except (OSError, StopIteration):
                    continue
            out[name] = kb / 1024
        return out

    def stop(self) -> None:
        for name in list(self.workers):
            self.stop_worker(name)
        self.cli("down")


def bench_pool(device, repeats, grid="smoke"):
    """The smoke grid as flow runs on the work pool: one worker, then two (separate
    checkouts, one cell at a time each), cells per hour side by side; and the orchestration
    per cell: each worker's share of the wall time per cell, less the pipeline inside the cell."""
    rates, overheads, up_seconds = {}, {}, []
    for workers in (1, 2):
        # a lab of its own per configuration: with one remote and cache, the second sweep
        # would restore the first one's stages instead of computing them
        root = lab_root()
        lab = Lab(root)
        try:
            start = time.perf_counter()
            lab.up()
            up_seconds.append(time.perf_counter() - start)
            for i in range(1, workers + 1):
                lab.start_worker(f"w{i}")
            start = time.perf_counter()
            proc = lab.sweep("--out", str(root / "sweep"), timeout=1800)
            wall = time.perf_counter() - start
            if proc.returncode:
                raise RuntimeError(f"pool sweep ({workers} workers) failed: {proc.stderr[-2000:]}")
            client = lab.mlflow()
            exp = client.get_experiment_by_name(f"mixmerge-sweep-{grid}")
            runs = client.search_runs([exp.experiment_id], filter_string="attributes.status = 'FINISHED' "
                                      "and tags.`mixmerge.cell` != ''")
            rates[workers] = 3600 * len(runs) / wall
            # a worker's time per cell not spent in the pipeline: queueing, polling, process start,
            # Prefect and MLflow calls, the DVC push
            cell_seconds = [r.data.metrics["cell_seconds"] for r in runs]
            overheads[workers] = workers * wall / len(runs) - sum(cell_seconds) / len(cell_seconds)
            memory = lab.server_memory_mb()
        finally:
            lab.stop()
            shutil.rmtree(root, ignore_errors=True)
    return {"row": f"sweep on the work pool ({grid})", "baseline": "1 worker", "candidate": "2 workers",
            "baseline_value": rates[1], "candidate_value": rates[2], "unit": "cells/hour",
            "ratio": rates[2] / rates[1], "reading": f"{rates[1]:.0f} -> {rates[2]:.0f}/h",
            "target": "near 2x with 2 workers on 2 machines",
            "note": (f"orchestration per cell (workers x wall / cells, less the pipeline's own time): "
                     f"{overheads[1]:.1f} s with 1 worker, {overheads[2]:.1f} s with 2; cluster up "
                     f"{min(up_seconds):.1f}-{max(up_seconds):.1f} s; "
                     "both workers share this machine's 2 cores; servers' memory (PSS) after the 2-worker sweep: "
                     + ", ".join(f"{k} {v:.0f} MB" for k, v in memory.items()))}
