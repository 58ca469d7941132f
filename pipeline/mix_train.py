"""Stage mix_train: fine-tune copies of the pretrained backbone, one per shard, with a mixer.

``--shard K`` trains one expert (dvc.yaml declares one stage per shard with foreach).
``--shard 0 1 2 3`` trains those experts together in this one process, parameters stacked
and vmapped (pipeline.stacked): the same result per expert within float tolerance, without
K processes each paying for imports and data loading. The Prefect flow does this with
``stack_shards=True`` and then records each shard stage with `dvc commit`. A recipe that
mixes hidden layers (manifold mixup hooks the model) cannot be vmapped: those experts are
trained one after another in this process instead.
"""
from __future__ import annotations

import contextlib

import torch

from pipeline import cli, config, layout
from pipeline.checkpoints import md5, save_tensors, write_csv
from pipeline.metrics import accuracy
from pipeline.mix_recipe import MixRecipe
from pipeline.models import channels_last
from pipeline.progress import Progress
from pipeline.stacked import RngStreams, fit_stacked
from pipeline.data_path import BatchSource
from pipeline.stage_io import inherited_metadata, load_manifest, load_model, load_prepared, shard_tensors, source
from pipeline.tracking import Tracker
from pipeline.training import Schedule, fit, predict_logits


def mixing_seed(seed: int, shard: int) -> int:
    """Each expert's own stream of mixing randomness, whichever way it is trained."""
    return seed + 1000 * (shard + 1)


def batch_order_seed(seed: int, shard: int) -> int:
    return seed + shard


def main(argv: list[str] | None = None) -> None:
    p = cli.parser("mix_train")
    p.add_argument("--shard", type=int, nargs="+", required=True,
                   help="shard index; several train those experts together in one process")
    args = p.parse_args(argv)
    base, cfg = config.load("mix_train", args.params)
    shards = sorted(set(args.shard))
    bad = [k for k in shards if k not in base.shards]
    if bad:
        raise config.ConfigError(f"--shard {bad[0]}: not in base.shards {base.shards}")
    device = cli.setup(base.seed, base.device, base.torch_threads)
    data = load_prepared(device, base.data_path)
    manifest = load_manifest()
    shard_data = [source(data, *shard_tensors(data, manifest, k), device, base.loader_workers) for k in shards]
    mixer_name = "+".join(cfg.mixer_odds())
    schedule = Schedule(cfg.epochs, cfg.batch_size, cfg.lr, cfg.momentum, cfg.weight_decay)
    inputs = [layout.DATASET, layout.MANIFEST, layout.PRETRAINED]

    with contextlib.ExitStack() as stack:
        trackers = [stack.enter_context(Tracker("mix_train", f"mix_train/shard_{k}", params_file=args.params))
                    for k in shards]
        for k, tracker, shard in zip(shards, trackers, shard_data):
            tracker.log_params({"base": base.model_dump(), "mix_train": cfg.model_dump(), "shard": k,
                                "shard_size": len(shard), "stacked_with": len(shards)})
            tracker.record_inputs(inputs)
            tracker.log_dataset(f"shard_{k}", layout.MANIFEST, manifest["content_hash"], f"shard_{k}")

        model, pre_meta = load_model(layout.PRETRAINED, device)
        init = {n: t.clone() for n, t in model.state_dict().items()}
        recipes = [recipe_for(cfg, data.num_classes) for _ in shards]
        if len(shards) == 1 or recipes[0].mixes_hidden_layers:
            states, histories = [], []
            for k, recipe, one_shard in zip(shards, recipes, shard_data):
                model.load_state_dict(init)
                state, history = train_one(model, one_shard, recipe, cfg, schedule, base.seed, k, device,
                                           base.compile)
                states.append(state)
                histories.append(history)
        else:
            streams = RngStreams([mixing_seed(base.seed, k) for k in shards])
            progress = Progress(f"mix_train[shards {shards[0]}-{shards[-1]} stacked, {mixer_name}]", cfg.epochs)
            states, histories = fit_stacked(
                model, [init] * len(shards), shard_data,
                lambda i, x, y: streams.run(i, recipes[i].batch, x, y),
                recipes[0].loss, schedule,
                [cli.generator(batch_order_seed(base.seed, k), device) for k in shards], device,
                on_epoch=lambda e, losses: progress.update(e, sum(losses) / len(losses)), compile=base.compile,
            )

        for k, tracker, state, history, shard in zip(shards, trackers, states, histories, shard_data):
            model.load_state_dict(state)
            val_acc = accuracy(predict_logits(model, data.x_val), data.y_val)
            metadata = {
                **inherited_metadata(pre_meta),
                "stage": "mix_train",
                "shard": k,
                "shard_size": len(shard),
                "label_histogram": manifest["shards"][k]["label_histogram"],
                "config": {"base": base.model_dump(), "mix_train": cfg.model_dump()},
                "inputs": {str(f): md5(f) for f in inputs},
            }
            out, hist_csv = layout.expert(k), layout.expert_history(k)
            save_tensors(out, state, metadata)
            write_csv(hist_csv, [{"epoch": i + 1, "loss": round(v, 6)} for i, v in enumerate(history)],
                      ["epoch", "loss"])
            tracker.log_history({"loss": history})
            tracker.log_metrics({"val_accuracy": val_acc})
            tracker.record_outputs([out, hist_csv])
            tracker.log_artifacts([hist_csv])
            print(f"mix_train: shard {k} ({len(shard)} samples, {mixer_name}, {cfg.loss.method}) val accuracy {val_acc:.4f}")


def recipe_for(cfg, num_classes: int) -> MixRecipe:
    return MixRecipe(cfg.mixer_odds(), cfg.mix_alpha, num_classes, cfg.loss.method, cfg.loss.options,
                     cfg.label_smoothing)


def train_one(model, shard_data: BatchSource, recipe: MixRecipe, cfg, schedule, seed, shard, device,
              compile: bool = False):
    """One expert in this process: torch's own optimiser and scheduler (training.fit)."""
    torch.manual_seed(mixing_seed(seed, shard))  # torchvision's mixers draw from the global RNG
    g = cli.generator(batch_order_seed(seed, shard), device)
    progress = Progress(f"mix_train[shard {shard}, {'+'.join(recipe.names)}]", cfg.epochs)
    model = channels_last(model)
    model.train()
    forward = torch.compile(model) if compile else model  # shares the model's parameters

    def loss_fn(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        inputs, targets = recipe.batch(xb, yb)
        return recipe.loss(forward(inputs), targets)

    hooks = recipe.attach(model)
    try:
        history = fit(model.parameters(), loss_fn, shard_data, schedule, g, device,
                      on_epoch=lambda e, loss: progress.update(e, loss))
    finally:
        for h in hooks:
            h.remove()
    return {n: t.detach().clone() for n, t in model.state_dict().items()}, history


if __name__ == "__main__":
    cli.run("mix_train", main)
