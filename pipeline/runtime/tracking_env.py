"""MLflow's settings that must be in the environment before mlflow is imported. No heavy
imports here: the flows set them too, without importing torch."""
from __future__ import annotations

import os


def quiet_mlflow() -> None:
    """MLflow's INFO chatter and artifact progress bars would bury the stage's own lines."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when mlflow is imported


def bounded_tracking_waits() -> None:
    """A tracking server that is down must stop a stage in seconds, not after MLflow's default
    7 retries with exponential backoff (256 s, then a 116-line traceback). Set before mlflow is
    imported; a user's own values win."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
