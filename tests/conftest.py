import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bench.workspace import REPO, make_project, set_key  # noqa: F401  (re-exported for the tests)


def default_params() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def subprocess_env(**extra) -> dict:
    """The test interpreter's environment first on PATH, the repo importable, no outside MLflow."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(REPO)
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("MIXMERGE_PARENT_RUN_ID", None)
    env.update(extra)
    return env


def forget_mlflow_tracking_uri() -> None:
    """After stages ran in the test process: their Tracker set MLflow's global tracking URI
    (and MLFLOW_TRACKING_URI), which later tests would otherwise inherit."""
    import mlflow

    mlflow.set_tracking_uri(None)


def run(cmd: list[str], cwd: Path, **env) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=subprocess_env(**env), capture_output=True, text=True)


# -- a real copy of the project, for the end-to-end and flow tests ---------------------------

TINY = {
    "base.shards": [0, 1, 2],
    "pretrain.epochs": 3,
    "pretrain.width": 8,
    "mix_train.epochs": 2,
    "federate.rounds": 2,
    "prepare.partition.min_shard_size": 5,
}


@pytest.fixture(scope="session")
def repro_project(tmp_path_factory):
    """The tiny project after one `dvc repro`."""
    root = make_project(tmp_path_factory.mktemp("repro"), TINY)
    proc = run([sys.executable, "-m", "dvc", "repro"], root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root
