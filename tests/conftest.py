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
