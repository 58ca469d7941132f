"""Stage mix_train: fine-tune a copy of the pretrained backbone on one shard with a mixer.

Run once per shard (``--shard i``); dvc.yaml declares one stage per shard with foreach.
"""
from __future__ import annotations

import torch

from pipeline import cli, config, layout
from pipeline.checkpoints import md5, save_tensors, write_csv
from pipeline.metrics import accuracy
from pipeline.mixers import MIXERS, soft_cross_entropy
from pipeline.progress import Progress
from pipeline.stage_io import load_model, load_manifest, load_prepared
from pipeline.tracking import Tracker
from pipeline.training import Schedule, fit, predict_logits



def main(argv: list[str] | None = None) -> None:
    p = cli.parser("mix_train")
    p.add_argument("--shard", type=int, required=True)
    args = p.parse_args(argv)
    base, cfg = config.load("mix_train", args.params)
    if args.shard not in base.shards:
        raise config.ConfigError(f"--shard {args.shard}: not in base.shards {base.shards}")
    # Each shard gets its own seed so experts differ in more than their data.
    device = cli.setup(base.seed + 1000 * (args.shard + 1), base.device, base.torch_threads)
    data = load_prepared(device)
    manifest = load_manifest()
    shard = manifest["shards"][args.shard]
    idx = torch.tensor(shard["indices"], dtype=torch.long, device=device)
    x, y = data.x_train[idx], data.y_train[idx]
    mix = MIXERS[cfg.mixer]

    with Tracker("mix_train", f"mix_train/shard_{args.shard}", params_file=args.params) as tracker:
        tracker.log_params({"base": base.model_dump(), "mix_train": cfg.model_dump(), "shard": args.shard,
                            "shard_size": len(idx)})
        inputs = [layout.DATASET, layout.MANIFEST, layout.PRETRAINED]
        producers = tracker.record_inputs(inputs)
        tracker.log_dataset(f"shard_{args.shard}", layout.MANIFEST, manifest["content_hash"], f"shard_{args.shard}")

        model, pre_meta = load_model(layout.PRETRAINED, device)
        if device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        g = cli.generator(base.seed + args.shard, device)
        progress = Progress(f"mix_train[shard {args.shard}, {cfg.mixer}]", cfg.epochs)
        model.train()

        def loss_fn(b: torch.Tensor) -> torch.Tensor:
            xm, ym = mix(x[b], y[b], data.num_classes, cfg.mix_alpha)
            return soft_cross_entropy(model(xm), ym)

        history = fit(model.parameters(), loss_fn, len(idx),
                      Schedule(cfg.epochs, cfg.batch_size, cfg.lr, cfg.momentum, cfg.weight_decay), g, device,
                      on_epoch=lambda e, loss: progress.update(e, loss))
        val_acc = accuracy(predict_logits(model, data.x_val), data.y_val)

        metadata = {
            **{k: pre_meta[k] for k in ("architecture", "normalization", "image_shape", "classes")},
            "stage": "mix_train",
            "shard": args.shard,
            "shard_size": len(idx),
            "label_histogram": shard["label_histogram"],
            "config": {"base": base.model_dump(), "mix_train": cfg.model_dump()},
            "inputs": {str(f): md5(f) for f in inputs},
        }
        out = layout.expert(args.shard)
        save_tensors(out, model.state_dict(), metadata)
        hist_csv = layout.expert_history(args.shard)
        write_csv(hist_csv, [{"epoch": i + 1, "loss": round(v, 6)} for i, v in enumerate(history)], ["epoch", "loss"])
        tracker.log_history({"loss": history})
        tracker.log_metrics({"val_accuracy": val_acc})
        tracker.record_outputs([out, hist_csv])
        tracker.log_artifacts([hist_csv])
    print(f"mix_train: shard {args.shard} ({len(idx)} samples, {cfg.mixer}) val accuracy {val_acc:.4f}; "
          f"inputs from {len(set(producers.values()))} runs")


if __name__ == "__main__":
    cli.run("mix_train", main)
