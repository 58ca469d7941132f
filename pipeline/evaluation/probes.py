"""How good a model's representation is, apart from its own classifier: a linear probe and a
k-nearest-neighbour classifier on frozen features.

Both are fitted on a fixed-size subset of the training split (``evaluate.probe_samples``,
seeded; the usual practice for probes on large datasets) and scored on the given split, so
their cost does not grow with the dataset. The probe is scikit-learn's multinomial logistic
regression on standardised features. kNN votes among the k nearest training features by
cosine similarity (k = 20, the usual choice in self-supervised papers), computed on the
features' device in chunks: one matrix product per chunk instead of scikit-learn's
brute-force search on the host, with the same votes (tested against KNeighborsClassifier).
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from pipeline.nn.inference import extract_features


def knn_predict(train: torch.Tensor, y_train: torch.Tensor, query: torch.Tensor, k: int = 20,
                num_classes: int | None = None, chunk: int = 1024) -> torch.Tensor:
    """Majority vote of each query's k most cosine-similar training features; a tie goes to
    the smallest label (as scikit-learn's uniform-weight vote)."""
    k = min(k, len(train))
    num_classes = num_classes or int(y_train.max()) + 1
    train_n = F.normalize(train.float(), dim=1)
    out = []
    for start in range(0, len(query), chunk):
        sims = F.normalize(query[start:start + chunk].float(), dim=1) @ train_n.T
        neighbours = y_train[sims.topk(k, dim=1).indices]
        out.append(F.one_hot(neighbours, num_classes).sum(1).argmax(1))
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long, device=query.device)


def probe_scores(model: torch.nn.Module, x_train: torch.Tensor, y_train: torch.Tensor, x_eval: torch.Tensor,
                 y_eval: torch.Tensor, k: int = 20, batch_size: int = 512) -> dict[str, float]:
    """Linear-probe and kNN accuracy on ``x_eval``, both fitted on ``x_train`` (pass a subset)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    train = extract_features(model, x_train, batch_size)
    evaluated = extract_features(model, x_eval, batch_size)
    y_train = y_train.to(train.device)
    num_classes = int(max(y_train.max(), y_eval.max())) + 1
    knn = knn_predict(train, y_train, evaluated, k, num_classes)
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # a probe's last digits, not its verdict
        probe.fit(train.cpu().numpy(), y_train.cpu().numpy())
    ye = y_eval.cpu().numpy()
    return {"probe_accuracy": float((probe.predict(evaluated.cpu().numpy()) == ye).mean()),
            "knn_accuracy": float((knn.cpu().numpy() == ye).mean())}
