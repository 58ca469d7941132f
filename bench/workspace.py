"""A fresh copy of this project (source files only, no outputs) as its own git + DVC repo,
for runs that must not touch the working tree: the end-to-end tests and the benchmarks."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml

from pipeline.runtime.config import set_key  # also re-exported for the tests

REPO = Path(__file__).resolve().parents[1]


def is_pipeline_output(path: str) -> bool:
    """Files a pipeline run leaves in the work tree (git-visible DVC outputs and the lock)."""
    if path == "dvc.lock" or path.startswith("results/"):
        return True
    return path.startswith("data/") and path != "data/README.md" and not path.endswith(".gitignore")


def project_files() -> list[str]:
    """Committed and not-yet-committed source files; never a local run's outputs."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                         cwd=REPO, capture_output=True, text=True, check=True)
    return [f for f in out.stdout.splitlines() if (REPO / f).is_file() and not is_pipeline_output(f)]


def make_project(dest: Path, overrides: dict) -> Path:
    """Copy the repository's files into ``dest`` with params overridden, and commit them."""
    for f in project_files():
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, dest / f)
    page = REPO / ".dvc" / "offline_plots.html"  # generated (git-ignored): `dvc plots show` needs it
    if page.exists():
        shutil.copy2(page, dest / ".dvc" / page.name)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for k, v in overrides.items():
        set_key(params, k, v)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], [*git, "commit", "-qm", "copy"]):
        subprocess.run(cmd, cwd=dest, check=True, capture_output=True)
    return dest
