import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def default_params() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def set_key(params: dict, dotted: str, value) -> dict:
    node = params
    *parents, last = dotted.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value
    return params


def subprocess_env(**extra) -> dict:
    """The test interpreter's environment first on PATH, the repo importable, no outside MLflow."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(REPO)
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("MIXMERGE_PARENT_RUN_ID", None)
    env.update(extra)
    return env


def run(cmd: list[str], cwd: Path, **env) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=subprocess_env(**env), capture_output=True, text=True)


# -- a real copy of the project, for the end-to-end and flow tests ---------------------------
import shutil  # noqa: E402

import pytest  # noqa: E402

TINY = {
    "base.shards": [0, 1, 2],
    "pretrain.epochs": 3,
    "pretrain.width": 8,
    "mix_train.epochs": 2,
    "prepare.partition.min_shard_size": 5,
}


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
    """Copy the repository's files (no outputs, no caches) into a fresh git + DVC repo."""
    for f in project_files():
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, dest / f)
    params = default_params()
    for k, v in overrides.items():
        set_key(params, k, v)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], [*git, "commit", "-qm", "copy"]):
        subprocess.run(cmd, cwd=dest, check=True, capture_output=True)
    return dest


@pytest.fixture(scope="session")
def repro_project(tmp_path_factory):
    """The tiny project after one `dvc repro`."""
    root = make_project(tmp_path_factory.mktemp("repro"), TINY)
    proc = run([sys.executable, "-m", "dvc", "repro"], root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root
