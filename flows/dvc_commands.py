"""Thin helpers around the DVC command line and DVC's read-only stage graph.

(Not named dvc.py: a worker loads the flow file by path, which puts flows/ on sys.path,
where a dvc.py would shadow the dvc package.)
"""
from __future__ import annotations

import contextlib
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator


# How long the flow waits for DVC's repository lock held by another dvc process
LOCK_WAIT_S = float(os.environ.get("MIXMERGE_DVC_LOCK_WAIT_S", 600))


@dataclass(frozen=True)
class Stage:
    name: str  # DVC's address, e.g. "mix_train@2"
    cmd: str


def layers(root: Path) -> list[list[Stage]]:
    """The pipeline's stages in topological generations, read from DVC's own graph: every
    stage of one generation depends only on earlier ones, so they may run concurrently."""
    return graph(root)[0]


def graph(root: Path) -> tuple[list[list[Stage]], dict[str, list[str]]]:
    """The generations (see ``layers``) and, for each stage, the stages whose outputs it reads."""
    import networkx as nx
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        g = repo.index.graph  # edges point from a stage to the stages it depends on
        # stage.name, not stage.addressing: the latter is relative to *this* process's cwd
        # ("../proj/dvc.yaml:prepare"), but the dvc commands run inside the project.
        generations = [
            sorted((Stage(s.name, s.cmd) for s in gen), key=lambda s: s.name)
            for gen in nx.topological_generations(g.reverse(copy=False))
        ]
        upstream = {s.name: sorted(d.name for d in g.successors(s)) for s in g.nodes}
        return generations, upstream


def stage_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for stage commands: this interpreter's bin folder first on PATH, so
    `python -m pipeline.<stage>` runs in the same environment as the flow."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"  # each line reaches the flow's log as it is printed
    env.update(extra or {})
    return env


def dvc(root: Path, *args: str) -> subprocess.CompletedProcess:
    """Run a DVC command, waiting for (not failing on) the repository lock."""
    return subprocess.run(
        [sys.executable, "-m", "dvc", "--wait-for-lock", *args],
        cwd=root, env=stage_env(), capture_output=True, text=True,
    )


@contextlib.contextmanager
def locked_repo(root: Path) -> Iterator:
    """DVC's repository at ``root``, its lock held; waits for another DVC process that holds
    it (a `dvc repro`, a `dvc commit`), as `dvc --wait-for-lock` does, but not for ever."""
    from dvc.lock import LockError
    from dvc.repo import Repo

    deadline, said = time.monotonic() + LOCK_WAIT_S, False
    while True:
        try:
            with Repo(str(root)) as repo, repo.lock:
                yield repo
                return
        except LockError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"DVC's repository lock in {root} stayed taken for {LOCK_WAIT_S:.0f} s "
                                   f"(another dvc process is running there)") from None
            if not said:
                print(f"waiting for DVC's repository lock in {root} (another dvc process holds it)", flush=True)
                said = True
            time.sleep(0.5)


def stale(root: Path, names: list[str]) -> list[str]:
    """The stages among ``names`` that DVC reports as changed (or never run).

    Asked in-process, under DVC's repository lock, of each stage itself (what `dvc status`
    computes per stage): starting a `dvc status` process per layer was most of the flow's
    per-stage overhead."""
    with locked_repo(root) as repo:
        stages = {s.name: s for s in repo.index.stages}
        return [n for n in names if stages[n].status()]


def has_default_remote(root: Path) -> bool:
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return bool(repo.config["core"].get("remote"))


def run_cache_sources(root: Path) -> tuple[bool, bool]:
    """(whether DVC's run cache can hold anything for this project, whether to pull from its
    default remote): a project with no run-cache entry and no remote skips the restore attempts
    (each opens the repository and hashes the stage's inputs)."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        remote = bool(repo.config["core"].get("remote"))
        runs = Path(repo.cache.legacy.path) / "runs"
    return remote or (runs.is_dir() and any(runs.iterdir())), remote


def restore_from_run_cache(root: Path, names: list[str], pull: bool = False, write_lock: bool = True) -> list[str]:
    """The stages among ``names`` (stale ones) that DVC's run cache holds for their current
    code, params and inputs, restored as `dvc repro` restores them: outputs checked out from
    the cache (``pull``: fetched from the default remote first, with the remote's run-cache
    entries), dvc.lock entries written (unless not ``write_lock``: the caller writes them later,
    see flows.sweep_cell). Returns the restored ones; the rest must run."""
    from dvc.stage.cache import RunCacheNotFoundError

    restored = []
    # DVC's run cache builds the cached stage from the relative path "dvc.yaml", resolved
    # against the working directory: restore from the project's folder. The flow calls this
    # between generations, when none of its stage threads is running.
    with contextlib.chdir(root), locked_repo(root) as repo:
        if pull:
            try:
                repo.stage_cache.pull(None)
            except Exception as e:  # noqa: BLE001  (a remote that is down: compute instead)
                print(f"DVC's run cache could not be pulled from the remote ({e}); computing instead", flush=True)
                pull = False
        stages = {s.name: s for s in repo.index.stages}
        for name in names:
            stage = stages[name]
            try:
                repo.stage_cache.restore(stage, pull=pull)
            except RunCacheNotFoundError:
                continue
            except Exception as e:  # noqa: BLE001  (an output that is not in the cache would be overwritten)
                print(f"{name}: not restored from DVC's run cache ({type(e).__name__}: {e}); running it", flush=True)
                continue
            stage.save()
            stage.commit()
            restored.append(name)
        if restored and write_lock:  # one write of dvc.lock for all of them, as `dvc commit` does
            stages[restored[0]].dvcfile.dump_stages([stages[n] for n in restored], update_pipeline=False)
    return restored


def commit(root: Path, names: list[str]) -> None:
    """Record stages whose commands already ran: dvc.lock entries and cached outputs,
    exactly as `dvc repro` would have written them."""
    out = dvc(root, "commit", "--force", *names)
    if out.returncode != 0:
        raise RuntimeError(f"dvc commit {' '.join(names)} failed: {out.stderr.strip()}")


SHARD_STAGE = "mix_train@"


def stacked_shard_units(units: list[list[Stage]]) -> list[list[Stage]]:
    """Put every mix_train shard stage among ``units`` into one unit, run as one stacked process."""
    shards = [u[0] for u in units if u[0].name.startswith(SHARD_STAGE)]
    rest = [u for u in units if not u[0].name.startswith(SHARD_STAGE)]
    return rest + ([shards] if len(shards) > 1 else [[s] for s in shards])


def unit_command(unit: list[Stage]) -> Stage:
    """The command that runs a unit: the stage's own, or one command for several shard stages
    (mix_train@0, @1, ... -> python -m pipeline.mix_train --shard 0 1 ...)."""
    if len(unit) == 1:
        return unit[0]
    shards = [s.name.removeprefix(SHARD_STAGE) for s in unit]
    return Stage(SHARD_STAGE + ",".join(shards), f"python -m pipeline.mix_train --shard {' '.join(shards)}")


def python_module(stage: Stage, strict: bool = True) -> tuple[str, list[str]] | None:
    """(module, arguments) of a stage command of the form ``python -m <module> [args...]``,
    split as a shell would but never run by one; for another command, a ValueError (or None
    when not ``strict``)."""
    argv = shlex.split(stage.cmd)
    if len(argv) < 3 or argv[0] != "python" or argv[1] != "-m":
        if not strict:
            return None
        raise ValueError(f"{stage.name}: `{stage.cmd}` is not `python -m <module> ...`")
    return argv[2], argv[3:]
