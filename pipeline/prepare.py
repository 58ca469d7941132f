"""Stage prepare: load a dataset, normalise, split train/val/test, partition train into K shards.

Outputs: the prepared tensors (safetensors), a partition manifest (indices and label
histogram per shard, content hash) and a heatmap of labels per shard.
"""
from __future__ import annotations

import inspect
import json

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from pipeline.runtime import cli, config
from pipeline.runtime.progress import ComputeClock
from pipeline.io import layout, plots
from pipeline.io.checkpoints import atomic_write, md5, save_tensors, write_json
from pipeline.io.datasets import DATASETS, Images
from pipeline.methods.partition.schemes import PARTITIONERS, label_histograms, partition_hash
from pipeline.io.tracking import Tracker



def split(train: Images, test: Images | None, val_fraction: float, test_fraction: float, seed: int):
    """Stratified, seeded split. The official test split is kept when the dataset has one."""
    idx = np.arange(len(train.y))
    labels = train.y.numpy()
    if test is None:
        idx, test_idx = train_test_split(idx, test_size=test_fraction, stratify=labels, random_state=seed)
        test = Images(train.x[test_idx], train.y[test_idx])
    tr_idx, val_idx = train_test_split(idx, test_size=val_fraction, stratify=labels[idx], random_state=seed)
    return Images(train.x[tr_idx], train.y[tr_idx]), Images(train.x[val_idx], train.y[val_idx]), test


def heterogeneity(hist: np.ndarray) -> float:
    """Mean total-variation distance between each shard's label distribution and the global one
    (0 = IID, approaching 1 = disjoint label sets)."""
    p = hist / hist.sum(1, keepdims=True).clip(min=1)
    q = hist.sum(0) / hist.sum()
    return float(0.5 * np.abs(p - q).sum(1).mean())


def effective_classes(row: np.ndarray) -> float:
    """exp(entropy) of a shard's label distribution: how many equally common classes it is worth."""
    p = row[row > 0] / max(row.sum(), 1)
    return float(np.exp(-(p * np.log(p)).sum())) if len(p) else 0.0


def partition_card(manifest: dict) -> str:
    """A one-page Markdown summary of the partition: what drew it, and each shard's labels."""
    classes = manifest["classes"]
    hist = np.array([s["label_histogram"] for s in manifest["shards"]])
    total = hist.sum(1)
    q = hist.sum(0) / hist.sum()
    lines = [
        f"# Partition card: {manifest['dataset']}, {manifest['method']}, K = {manifest['num_shards']}",
        "",
        f"- options: {json.dumps(manifest['options'])}; seed {manifest['seed']}; content hash `{manifest['content_hash']}`",
        f"- heterogeneity (mean total-variation distance to the global label distribution; 0 = IID): "
        f"{manifest['heterogeneity']:.3f}",
        f"- effective classes per shard (exp entropy; {len(classes)} = all classes equally): "
        f"mean {np.mean([effective_classes(r) for r in hist]):.2f}",
        f"- shard sizes: {total.tolist()} (smallest/largest {total.min() / max(total.max(), 1):.2f})",
        "- the same partition is redrawn from this seed and these options; `indices` in partition.json list it",
        "",
        "| shard | size | effective classes | TV to global | " + " | ".join(map(str, classes)) + " |",
        "|---|---|---|---|" + "---|" * len(classes),
    ]
    for i, row in enumerate(hist):
        tv = 0.5 * np.abs(row / max(row.sum(), 1) - q).sum()
        lines.append(f"| {i} | {row.sum()} | {effective_classes(row):.2f} | {tv:.3f} | "
                     + " | ".join(str(int(v)) for v in row) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = cli.parser("prepare").parse_args(argv)
    base, cfg = config.load("prepare", args.params)
    cli.setup(base.seed, "cpu", base.torch_threads)
    k = len(base.shards)

    clock = ComputeClock()
    with clock.measure():  # decoding and splitting the dataset is this stage's computation
        raw = DATASETS[cfg.dataset](root=cfg.root, download=cfg.download, image_size=cfg.image_size)
        train, val, test = split(raw.train, raw.test, cfg.val_fraction, cfg.test_fraction, base.seed)
    if k > len(train.y):
        raise config.ConfigError(f"base.shards has {k} shards: more than the {len(train.y)} training samples")
    part = cfg.partition
    partitioner = PARTITIONERS[part.method]
    accepted = inspect.signature(partitioner).parameters
    opts = {k: v for k, v in part.model_dump().items() if k != "method" and k in accepted}
    try:
        with clock.measure():
            shards = partitioner(train.y.numpy(), k, np.random.default_rng(base.seed), **opts)
    except ValueError as e:
        raise config.ConfigError(f"prepare.partition ({part.method}): {e}") from None

    # Normalise with the training split's per-channel statistics.
    mean = train.x.mean(dim=(0, 2, 3))
    std = train.x.std(dim=(0, 2, 3)).clamp(min=1e-6)
    norm = lambda x: ((x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)).float()  # noqa: E731

    num_classes = len(raw.classes)
    hist = label_histograms(train.y.numpy(), shards, num_classes)
    manifest = {
        "dataset": cfg.dataset,
        "method": part.method,
        "options": opts,
        "seed": base.seed,
        "num_shards": k,
        "num_classes": num_classes,
        "classes": raw.classes,
        "heterogeneity": round(heterogeneity(hist), 6),
        "content_hash": partition_hash(shards),
        "shards": [
            {"shard": i, "size": int(len(s)), "label_histogram": hist[i].tolist(), "indices": s.tolist()}
            for i, s in enumerate(shards)
        ],
    }
    dataset_meta = {
        "dataset": cfg.dataset,
        "classes": raw.classes,
        "num_classes": num_classes,
        "image_shape": list(train.x.shape[1:]),
        "mean": mean.tolist(),
        "std": std.tolist(),
        "sizes": {"train": len(train.y), "val": len(val.y), "test": len(test.y)},
    }
    tensors = {
        "x_train": norm(train.x), "y_train": train.y,
        "x_val": norm(val.x), "y_val": val.y,
        "x_test": norm(test.x), "y_test": test.y,
    }

    with Tracker("prepare", "prepare", params_file=args.params) as tracker:
        tracker.log_params({"base": base.model_dump(), "prepare": cfg.model_dump()})
        tracker.record_inputs([])
        save_tensors(layout.DATASET, tensors, dataset_meta)
        write_json(layout.MANIFEST, manifest)
        title = f"{cfg.dataset}: {part.method} partition, K={k}, heterogeneity {manifest['heterogeneity']:.3f}"
        plots.partition_heatmap(hist, raw.classes, title, layout.PARTITION_PNG)
        atomic_write(layout.PARTITION_CARD, partition_card(manifest).encode())
        outs = [layout.DATASET, layout.MANIFEST, layout.PARTITION_PNG, layout.PARTITION_CARD]
        tracker.record_outputs(outs)
        tracker.log_dataset(cfg.dataset, layout.DATASET, md5(layout.DATASET), "prepared")
        tracker.log_metrics({
            "heterogeneity": manifest["heterogeneity"],
            **{f"shard_size.{i}": len(s) for i, s in enumerate(shards)},
            "train_size": len(train.y), "val_size": len(val.y), "test_size": len(test.y),
            "compute_seconds": clock.seconds,
        })
        tracker.log_artifacts([layout.MANIFEST, layout.PARTITION_PNG, layout.PARTITION_CARD])
    print(f"prepare: {cfg.dataset} train/val/test = {len(train.y)}/{len(val.y)}/{len(test.y)}, "
          f"{k} shards ({part.method}), sizes {[len(s) for s in shards]}, heterogeneity {manifest['heterogeneity']:.3f}")


if __name__ == "__main__":
    cli.run("prepare", main)
