"""Registering a stage's models in MLflow's model registry (merge's merged models, federate's
global models), servable with `mlflow models serve`."""
from __future__ import annotations

import contextlib

from pipeline.io.tracking import Tracker, store_guarded


@store_guarded
def register(tracker: Tracker, name: str, path, meta: dict, registered_model: str, stage: str) -> str:
    """Log a models-from-code pyfunc (pipeline/io/serving.py) with the checkpoint as artifact,
    register it under ``registered_model`` and alias the version ``name``."""
    import io
    import logging
    import warnings

    import mlflow
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *meta["image_shape"]))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, meta["architecture"]["num_classes"]))]),
    )
    # MLflow prints registration chatter and hints that do not apply to a models-from-code
    # pyfunc with an explicit signature (and, in a uv venv without pip, a pip-version warning).
    logging.getLogger("mlflow.utils.environment").setLevel(logging.ERROR)
    chatter = io.StringIO()
    with mlflow.start_run(run_id=tracker.run_id), warnings.catch_warnings(), contextlib.redirect_stderr(chatter):
        warnings.simplefilter("ignore", UserWarning)
        info = mlflow.pyfunc.log_model(
            name=name,
            python_model="pipeline/io/serving.py",
            artifacts={"weights": str(path)},
            code_paths=["pipeline"],
            signature=signature,
            pip_requirements=["torch", "numpy", "safetensors", "mlflow"],  # skip slow inference
            registered_model_name=registered_model,
        )
    version = str(info.registered_model_version)
    tracker.client.set_model_version_tag(registered_model, version, "mixmerge.merger", name)  # the model's name in its stage (merger or run)
    tracker.client.set_registered_model_alias(registered_model, name, version)
    print(f"{stage}: registered models:/{registered_model}@{name} (version {version})")
    return version
