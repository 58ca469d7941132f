"""Stage commands run in processes forked from a warm one: each stage still gets a process of
its own (its own exit code, environment, working folder; killed alone), but without paying
for an interpreter start and the imports of torch, torchvision, scikit-learn and MLflow, which
cost a stage 2-5 s on 2 CPU cores, more than the computation of most stages on small data.

multiprocessing's forkserver does the warming: it imports PRELOAD once, and forks a child per
stage. The child sets up the environment and working folder the command would have had, then
runs `python -m <module> <args>` as runpy does for -m. Its stdout and stderr are pipes the
caller reads line by line while it runs, as for a subprocess. Nothing in PRELOAD touches CUDA or
starts threads (fork after either is unsafe); `pipeline` itself is not preloaded, so each stage
imports the project's current source, from its own folder.
"""
from __future__ import annotations

import atexit
import contextlib
import contextvars
import multiprocessing
import os
import signal
import sys
import threading
import types
from dataclasses import dataclass
from typing import Callable

PRELOAD = [
    "numpy", "torch", "torch.nn.functional", "torchvision", "safetensors.torch", "pydantic", "yaml",
    "sklearn.linear_model", "sklearn.neighbors", "scipy.optimize", "matplotlib", "matplotlib.figure",
    "mlflow", "mlflow.tracking", "mlflow.store.tracking.sqlalchemy_store", "mlflow.pyfunc",
    "mlflow.system_metrics.system_metrics_monitor",
]

def warm() -> bool:
    """Whether stage commands run forked from the warm server; MIXMERGE_COLD_STAGES=1 starts
    each as its own interpreter instead, as `dvc repro` does (the benchmark's baseline)."""
    return os.environ.get("MIXMERGE_COLD_STAGES", "") in ("", "0")


_context = None
_lock = threading.RLock()


def context():
    """The forkserver context, its server started (and PRELOAD imported) on first use."""
    global _context
    with _lock:
        if _context is None:
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(PRELOAD)
            _context = ctx
    return _context


def prewarm() -> None:
    """Start the warm server now, in the background: its imports (4-5 s on 2 cores) then
    overlap whatever the caller does next (the flow: starting its Prefect server)."""
    def start() -> None:
        from multiprocessing import forkserver

        context()  # sets the preload list
        with _lock:
            forkserver.ensure_running()

    threading.Thread(target=start, daemon=True, name="stage-runner-prewarm").start()


@dataclass
class Finished:
    returncode: int  # as subprocess reports it: the exit status, or -N for signal N


def _child(module: str, argv: list[str], cwd: str, env: dict[str, str], out, err) -> None:
    from flows.local_server import die_with_parent

    os.dup2(out.fileno(), 1)
    os.dup2(err.fileno(), 2)
    out.close()
    err.close()
    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)
    die_with_parent()  # the forkserver dies with the flow; the stage with the forkserver
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    sys.path.insert(0, cwd)  # as `python -m` puts the working folder first
    sys.argv = [module, *argv]
    import runpy

    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit:
        atexit._run_exitfuncs()
        raise  # multiprocessing turns it into the exit status, as the interpreter would
    except KeyboardInterrupt:  # Ctrl-C: exit as an interrupted `python -m` would
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(128 + signal.SIGINT)
    except BaseException:  # noqa: BLE001  (the traceback as `python -m` prints it, without
        import traceback  # multiprocessing's "Process ForkServerProcess-N:" line before it)

        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    # A forked child leaves through os._exit, which skips atexit: run what the stage
    # registered there, as the interpreter would at the end of `python -m`.
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()


@contextlib.contextmanager
def _main_hidden():
    """multiprocessing re-imports the caller's __main__ in every child it starts (the flow's
    module, with Prefect: seconds, and a Prefect client of its own). A stage needs none of it:
    while the child is started, __main__ is an empty module. Callers hold _lock."""
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


def run_module(module: str, argv: list[str], cwd: str, env: dict[str, str],
               on_stdout: Callable, on_stderr: Callable) -> Finished:
    """Run ``python -m module argv`` in a process forked from the warm server, calling
    ``on_stdout(stream)`` and ``on_stderr(stream)`` (in threads) with line-iterable text
    streams of its output; returns when it has exited and both streams are drained."""
    ctx = context()
    out_r, out_w = ctx.Pipe(duplex=False)
    err_r, err_w = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(module, argv, cwd, env, out_w, err_w), daemon=False)
    with _lock, _main_hidden():
        proc.start()
    out_w.close()  # the child holds the only write ends: EOF when it exits
    err_w.close()
    streams = [os.fdopen(os.dup(c.fileno()), "r", encoding="utf-8", errors="replace") for c in (out_r, err_r)]
    out_r.close()
    err_r.close()
    # each reader in a copy of this context: Prefect's run context and API settings are context
    # variables, which a new thread would not see (its log lines would start a server of their own)
    readers = [threading.Thread(target=contextvars.copy_context().run, args=(fn, s), daemon=True)
               for fn, s in zip((on_stdout, on_stderr), streams)]
    for t in readers:
        t.start()
    proc.join()
    for t in readers:
        t.join()
    for s in streams:
        s.close()
    return Finished(proc.exitcode)
