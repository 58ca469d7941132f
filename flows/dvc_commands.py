"""Thin helpers around the DVC command line and DVC's read-only stage graph.

(Not named dvc.py: a worker loads the flow file by path, which puts flows/ on sys.path,
where a dvc.py would shadow the dvc package.)
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Stage:
    name: str  # DVC's address, e.g. "mix_train@2"
    cmd: str


def layers(root: Path) -> list[list[Stage]]:
    """The pipeline's stages in topological generations, read from DVC's own graph: every
    stage of one generation depends only on earlier ones, so they may run concurrently."""
    import networkx as nx
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        graph = repo.index.graph  # edges point from a stage to the stages it depends on
        # stage.name, not stage.addressing: the latter is relative to *this* process's cwd
        # ("../proj/dvc.yaml:prepare"), but the dvc commands run inside the project.
        return [
            sorted((Stage(s.name, s.cmd) for s in gen), key=lambda s: s.name)
            for gen in nx.topological_generations(graph.reverse(copy=False))
        ]


def stage_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for stage commands: this interpreter's bin folder first on PATH, so
    `python -m pipeline.<stage>` runs in the same environment as the flow."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra or {})
    return env


def dvc(root: Path, *args: str) -> subprocess.CompletedProcess:
    """Run a DVC command, waiting for (not failing on) the repository lock."""
    return subprocess.run(
        [sys.executable, "-m", "dvc", "--wait-for-lock", *args],
        cwd=root, env=stage_env(), capture_output=True, text=True,
    )


def stale(root: Path, names: list[str]) -> list[str]:
    """The stages among ``names`` that DVC reports as changed (or never run).

    Asked in-process, under DVC's repository lock, of each stage itself (what `dvc status`
    computes per stage): starting a `dvc status` process per layer was most of the flow's
    per-stage overhead."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo, repo.lock:
        stages = {s.name: s for s in repo.index.stages}
        return [n for n in names if stages[n].status()]


def commit(root: Path, names: list[str]) -> None:
    """Record stages whose commands already ran: dvc.lock entries and cached outputs,
    exactly as `dvc repro` would have written them."""
    out = dvc(root, "commit", "--force", *names)
    if out.returncode != 0:
        raise RuntimeError(f"dvc commit {' '.join(names)} failed: {out.stderr.strip()}")
