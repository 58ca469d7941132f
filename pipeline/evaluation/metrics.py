"""Classification metrics on logits. Pure tensor code."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return (logits.argmax(1) == y).float().mean().item()


def nll(logits: torch.Tensor, y: torch.Tensor) -> float:
    return F.cross_entropy(logits.float(), y).item()


def reliability_bins(probs: torch.Tensor, y: torch.Tensor, n_bins: int = 15) -> dict[str, torch.Tensor]:
    """Top-label confidence histogram on equal-width bins over (0, 1]: per bin the count,
    mean confidence and accuracy (empty bins report 0)."""
    conf, pred = probs.max(1)
    correct = (pred == y).float()
    # Bin b holds confidences in (b/n, (b+1)/n]; confidence 0 falls in bin 0.
    bins = (torch.ceil(conf * n_bins) - 1).clamp(0, n_bins - 1).long()
    count = torch.bincount(bins, minlength=n_bins).float()
    conf_sum = torch.bincount(bins, weights=conf, minlength=n_bins)
    acc_sum = torch.bincount(bins, weights=correct, minlength=n_bins)
    safe = count.clamp(min=1)
    return {"count": count, "confidence": conf_sum / safe, "accuracy": acc_sum / safe}


def expected_calibration_error(probs: torch.Tensor, y: torch.Tensor, n_bins: int = 15) -> float:
    """ECE (Guo et al. 2017): sum over bins of |accuracy - confidence| weighted by bin mass."""
    b = reliability_bins(probs, y, n_bins)
    return ((b["count"] / len(y)) * (b["accuracy"] - b["confidence"]).abs()).sum().item()


def per_class_accuracy(logits: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    correct = (logits.argmax(1) == y).float()
    hits = torch.bincount(y, weights=correct, minlength=num_classes)
    totals = torch.bincount(y, minlength=num_classes).float()
    return hits / totals.clamp(min=1)


def shard_accuracy(class_accuracy: torch.Tensor, label_histogram: torch.Tensor) -> float:
    """Accuracy on a shard's own label distribution: per-class test accuracy weighted by
    the shard's class proportions (the test set reweighted to look like that shard)."""
    p = label_histogram.float() / label_histogram.sum()
    return (p * class_accuracy).sum().item()


def classification_report(logits: torch.Tensor, y: torch.Tensor, n_bins: int,
                          temperature: float = 1.0) -> dict[str, float]:
    """Accuracy, NLL, ECE and Brier score; with a fitted ``temperature``, also the NLL and ECE
    of the temperature-scaled probabilities (accuracy does not change under scaling)."""
    probs = logits.float().softmax(1)
    scaled = (logits.float() / temperature).softmax(1)
    return {
        "accuracy": accuracy(logits, y),
        "nll": nll(logits, y),
        "ece": expected_calibration_error(probs, y, n_bins),
        "brier": brier_score(probs, y),
        "temperature": temperature,
        "nll_scaled": nll(logits.float() / temperature, y),
        "ece_scaled": expected_calibration_error(scaled, y, n_bins),
    }


def brier_score(probs: torch.Tensor, y: torch.Tensor) -> float:
    """Multi-class Brier score (Brier 1950): mean over samples of sum_c (p_c - [y = c])^2."""
    onehot = F.one_hot(y, probs.shape[1]).to(probs.dtype)
    return ((probs - onehot) ** 2).sum(1).mean().item()


def fit_temperature(logits: torch.Tensor, y: torch.Tensor, max_iter: int = 100) -> float:
    """Temperature scaling (Guo et al. 2017): the T > 0 minimising the NLL of softmax(logits / T),
    fitted by L-BFGS on log T (held-out data: the validation split)."""
    logits = logits.detach().float()
    log_t = torch.zeros(1, device=logits.device, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    return log_t.exp().item()
