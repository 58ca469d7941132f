"""One flow at a time per project.

Two flows in one checkout would both find the same stages stale and both compute them, writing
the same files at once. The flow holds an exclusive flock on .mixmerge/flow.lock while it runs;
a second flow waits for it (up to MIXMERGE_FLOW_WAIT_S, default an hour) and then finds the
stages up to date. The kernel drops the lock when its holder dies, SIGKILL included, so a killed
flow never leaves the project locked. (Not a PID file: those go stale.)
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from pathlib import Path
from typing import Callable, Iterator

def default_wait_s() -> float:
    return float(os.environ.get("MIXMERGE_FLOW_WAIT_S", 3600))


class ProjectBusy(RuntimeError):
    """Another flow kept the project for longer than we were asked to wait."""


@contextlib.contextmanager
def project_lock(root: Path, wait_s: float | None = None, say: Callable[[str], None] = print) -> Iterator[None]:
    wait_s = default_wait_s() if wait_s is None else wait_s
    path = Path(root) / ".mixmerge" / "flow.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline, said = time.monotonic() + wait_s, False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
                if time.monotonic() > deadline:
                    raise ProjectBusy(f"another flow ({holder}) kept {root} for {wait_s:.0f} s; "
                                      f"it is still running") from None
                if not said:
                    say(f"another flow ({holder}) is running in {root}; waiting for it to finish")
                    said = True
                time.sleep(0.5)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
