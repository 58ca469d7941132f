"""MLflow pyfunc model defined from code: loading it executes this file, never unpickles.

``mlflow.pyfunc.load_model("models:/<name>@<alias>").predict(images)`` takes a float
array of raw images in [0, 1], shaped (N, C, H, W) (the logged signature enforces it; the
model itself also takes (N, H, W) for one channel when called without the signature), applies
the normalisation stored in the checkpoint, and returns (N, num_classes) probabilities.
"""
from __future__ import annotations

import mlflow
import numpy as np
import torch


class MixMergeClassifier(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from pipeline.io.stage_io import load_model

        self.model, meta = load_model(context.artifacts["weights"], "cpu")
        self.model.eval()
        c = meta["image_shape"][0]
        self.mean = torch.tensor(meta["normalization"]["mean"]).view(1, c, 1, 1)
        self.std = torch.tensor(meta["normalization"]["std"]).view(1, c, 1, 1)

    def predict(self, context, model_input, params=None) -> np.ndarray:
        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        if x.ndim == 3:
            x = x.unsqueeze(1)
        with torch.no_grad():
            return self.model((x - self.mean) / self.std).softmax(1).numpy()


mlflow.models.set_model(MixMergeClassifier())
