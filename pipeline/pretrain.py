"""Stage pretrain: train a backbone on the whole training split (supervised or self-supervised).

A self-supervised objective leaves the classifier untrained, so a linear probe (the
classifier alone, on frozen features) is fitted afterwards; its validation accuracy is
the representation's linear-probe score, and the probed head makes the backbone usable as
a classifier and as the common start of the experts.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.runtime import cli, config
from pipeline.io import layout
from pipeline.io.checkpoints import md5, save_tensors, write_csv, write_json
from pipeline.evaluation.metrics import accuracy
from pipeline.nn.models import build, channels_last
from pipeline.methods.pretrain.objectives import OBJECTIVES
from pipeline.evaluation.probes import probe_scores
from pipeline.evaluation.subsets import fixed_subset
from pipeline.runtime.progress import ComputeClock, Progress
from pipeline.train.data_path import BatchSource
from pipeline.io.stage_io import architecture, load_prepared, source
from pipeline.io.tracking import Tracker
from pipeline.nn.inference import extract_features, predict_logits
from pipeline.train.loop import Schedule, fit

PROBE_SAMPLES = 5000  # evaluate.probe_samples' default: the probes' cost stays fixed as N grows


def linear_probe(model, x, y, num_classes, epochs, g, device) -> list[float]:
    """Fit only the classifier on frozen features (features computed once)."""
    feats = extract_features(model, x)
    head = model.classifier
    return fit(head.parameters(), lambda xb, yb: F.cross_entropy(head(xb), yb),
               BatchSource(feats, y, device), Schedule(epochs, 256, 0.1, 0.9, 0.0), g, device)


def main(argv: list[str] | None = None) -> None:
    args = cli.parser("pretrain").parse_args(argv)
    base, cfg = config.load("pretrain", args.params)
    device = cli.setup(base.seed, base.device, base.torch_threads)
    data = load_prepared(device, base.data_path)
    arch = architecture(cfg.arch, data, cfg.width)

    with Tracker("pretrain", "pretrain", params_file=args.params) as tracker:
        tracker.log_params({"base": base.model_dump(), "pretrain": cfg.model_dump()})
        producers = tracker.record_inputs([layout.DATASET])
        tracker.log_dataset("train", layout.DATASET, md5(layout.DATASET), "training")

        clock = ComputeClock(device)
        clock.start()  # stopped after the probes, below
        model = build(cfg.arch, arch["in_channels"], arch["num_classes"], arch["width"]).to(device)
        model = channels_last(model)
        objective = OBJECTIVES[cfg.method](model, data.x_train[:2].to(device), cfg.temperature).to(device)
        g = cli.generator(base.seed, device)
        progress = Progress(f"pretrain[{cfg.method}]", cfg.epochs)
        x, y = data.x_train, data.y_train
        model.train()
        loss_of = torch.compile(objective) if base.compile else objective
        history = fit(
            list(model.parameters()) + list(objective.parameters()),
            lambda xb, yb: loss_of(model, xb, yb, g),
            source(data, x, y, device, base.loader_workers), Schedule(cfg.epochs, cfg.batch_size, cfg.lr, cfg.momentum, cfg.weight_decay), g, device,
            on_epoch=lambda e, loss: progress.update(e, loss),
        )
        if not objective.trains_classifier:
            linear_probe(model, x, y, data.num_classes, cfg.probe_epochs, g, device)
        val_acc = accuracy(predict_logits(model, data.x_val), data.y_val)
        # probes fitted on at most PROBE_SAMPLES training images (all of the default digits)
        subset = fixed_subset(len(y), PROBE_SAMPLES, base.seed).to(y.device)
        representation = probe_scores(model, x[subset.to(x.device)], y[subset], data.x_val, data.y_val)
        clock.stop()

        metadata = {
            "stage": "pretrain",
            "architecture": arch,
            "normalization": {"mean": data.meta["mean"], "std": data.meta["std"]},
            "image_shape": data.meta["image_shape"],
            "classes": data.meta["classes"],
            "config": {"base": base.model_dump(), "pretrain": cfg.model_dump()},
            "inputs": {str(layout.DATASET): md5(layout.DATASET)},
        }
        save_tensors(layout.PRETRAINED, model.state_dict(), metadata)
        write_csv(layout.PRETRAIN_HISTORY, [{"epoch": i + 1, "loss": round(v, 6)} for i, v in enumerate(history)],
                  ["epoch", "loss"])
        metrics = {"val_accuracy": round(val_acc, 6), "final_loss": round(history[-1], 6),
                   **{f"val_{k}": round(v, 6) for k, v in representation.items()}}
        write_json(layout.PRETRAIN_METRICS, metrics)
        tracker.log_history({"loss": history})
        tracker.log_metrics({**metrics, "compute_seconds": clock.seconds})
        tracker.record_outputs([layout.PRETRAINED, layout.PRETRAIN_HISTORY, layout.PRETRAIN_METRICS])
        tracker.log_artifacts([layout.PRETRAIN_HISTORY, layout.PRETRAIN_METRICS])
    print(f"pretrain: {cfg.method} {cfg.arch}, {cfg.epochs} epochs, val accuracy {val_acc:.4f}"
          f"{' (linear probe)' if not objective.trains_classifier else ''}, sklearn probe "
          f"{representation['probe_accuracy']:.4f}, kNN {representation['knn_accuracy']:.4f}; inputs from {sorted(set(producers.values()))}")


if __name__ == "__main__":
    cli.run("pretrain", main)
