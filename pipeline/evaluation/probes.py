"""How good a model's representation is, apart from its own classifier: a linear probe and a
k-nearest-neighbour classifier on frozen features, both from scikit-learn.

Fitted on the training split's features, scored on the given split. The probe is a
multinomial logistic regression on standardised features; kNN votes among the k nearest
training features by cosine distance (k = 20, the usual choice in self-supervised papers).
"""
from __future__ import annotations

import warnings

import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from pipeline.nn.inference import extract_features


def probe_scores(model: torch.nn.Module, x_train: torch.Tensor, y_train: torch.Tensor, x_eval: torch.Tensor,
                 y_eval: torch.Tensor, k: int = 20, batch_size: int = 512) -> dict[str, float]:
    train = extract_features(model, x_train, batch_size).cpu().numpy()
    evaluated = extract_features(model, x_eval, batch_size).cpu().numpy()
    yt, ye = y_train.cpu().numpy(), y_eval.cpu().numpy()
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # a probe's last digits, not its verdict
        probe.fit(train, yt)
    knn = KNeighborsClassifier(n_neighbors=min(k, len(yt)), metric="cosine").fit(train, yt)
    return {"probe_accuracy": float((probe.predict(evaluated) == ye).mean()),
            "knn_accuracy": float((knn.predict(evaluated) == ye).mean())}
