"""A Prefect API server owned by this process, for runs with no PREFECT_API_URL.

Prefect's own temporary server is started as an ordinary child process: a flow killed with
SIGKILL leaves it listening (and holding 200 MB) for good, and Ctrl-C reaches it first, so the
flow then prints connection errors for minutes before it exits. This one is started the way
Prefect starts its temporary server (uvicorn on Prefect's app factory, UI off), but in its own
session, so the terminal's Ctrl-C goes to the flow alone (which stops the server on its way
out), and with the parent-death signal set, so the kernel stops it when the flow dies however
it dies (Linux; elsewhere only the first two hold).
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Iterator

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """For subprocess's preexec_fn: the child gets SIGTERM when the thread that started it dies."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:  # not Linux: the server is still stopped on a normal exit or Ctrl-C
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _drain_prefect_workers() -> None:
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        try:
            worker.drain_all(timeout=10)
        except Exception:  # noqa: BLE001  (nothing to drain, or already stopped)
            pass


@contextlib.contextmanager
def prefect_api(timeout: float = 120.0, ui: bool = False) -> Iterator[str | None]:
    """Yield the API URL of a server started for this block (stopped after it), or None when
    PREFECT_API_URL is set (a real server: nothing to start). ``ui``: serve Prefect's UI too
    (the screenshots need it; a pipeline run does not)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        yield None
        return
    import prefect

    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_UI_ENABLED": "1" if ui else "0", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_API_URL": url}
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent), "--factory",
         "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
         "--log-level", "error", "--lifespan", "on"],
        env=env, start_new_session=True, preexec_fn=die_with_parent,
    )
    try:
        deadline = time.time() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None:
                raise RuntimeError(f"the Prefect server exited with {server.returncode} before it answered")
            if time.time() > deadline:
                raise RuntimeError(f"the Prefect server did not answer on {url} within {timeout:.0f} s")
            time.sleep(0.2)
        print(f"Prefect server for this run: {url} (pid {server.pid}, ready in {time.time() - deadline + timeout:.1f} s; "
              f"stops with this process)", flush=True)
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield url
    finally:
        _drain_prefect_workers()  # the flow's last log lines and events, while the server still answers
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
