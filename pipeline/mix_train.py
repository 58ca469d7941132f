"""Stage mix_train: fine-tune copies of the pretrained backbone, one per shard, with a mixer.

``--shard K`` trains one expert (dvc.yaml declares one stage per shard with foreach).
``--shard 0 1 2 3`` trains those experts together in this one process
(pipeline.train.engine.train_models: parameters stacked and vmapped, or one after another
when the recipe hooks the model, as manifold mixup does): the same result per expert within
float tolerance, without K processes each paying for imports and data loading. The Prefect
flow does this with ``stack_shards=True`` and then records each shard stage with `dvc commit`.
"""
from __future__ import annotations

import contextlib
import copy
import time

from pipeline.runtime import cli, config
from pipeline.io import layout
from pipeline.io.checkpoints import md5, save_tensors, write_csv
from pipeline.evaluation.metrics import accuracy, nll
from pipeline.methods.mix.recipe import MixRecipe
from pipeline.runtime.progress import ComputeClock, Progress
from pipeline.train.engine import can_stack, train_models
from pipeline.io.stage_io import inherited_metadata, load_manifest, load_model, load_prepared, shard_tensors, source, split_digest
from pipeline.io.tracking import Tracker
from pipeline.nn.inference import predict_logits
from pipeline.train.loop import Schedule


def mixing_seed(seed: int, shard: int) -> int:
    """Each expert's own stream of mixing randomness (its recipe's numpy Generator), whichever
    way it is trained."""
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

    dataset_md5 = md5(layout.DATASET)
    with contextlib.ExitStack() as stack:
        trackers = [stack.enter_context(Tracker("mix_train", f"mix_train/shard_{k}", params_file=args.params))
                    for k in shards]
        for k, tracker, shard in zip(shards, trackers, shard_data):
            tracker.log_params({"base": base.model_dump(), "mix_train": cfg.model_dump(), "shard": k,
                                "shard_size": len(shard), "stacked_with": len(shards)})
            tracker.record_inputs(inputs)
            tracker.log_dataset(f"shard_{k}", layout.MANIFEST,
                                split_digest(dataset_md5, "train", manifest["shards"][k]["indices"]), "training")
            tracker.log_dataset("validation", layout.DATASET, split_digest(dataset_md5, "validation"), "validation")

        model, pre_meta = load_model(layout.PRETRAINED, device)
        init = {n: t.clone() for n, t in model.state_dict().items()}
        recipes = [recipe_for(cfg, data.num_classes, mixing_seed(base.seed, k)) for k in shards]
        stacked = can_stack(recipes)
        lines: dict[int, Progress] = {}  # one progress line per training run
        last_epoch_end = [time.perf_counter()]  # one after another, a run starts when the last ended

        def report(epoch: int, losses: dict[int, float]) -> None:
            i = min(losses)
            if i not in lines:
                what = f"shards {shards[0]}-{shards[-1]} stacked" if stacked else f"shard {shards[i]}"
                lines[i] = Progress(f"mix_train[{what}, {mixer_name}]", cfg.epochs, start=last_epoch_end[0])
            lines[i].update(epoch, sum(losses.values()) / len(losses))
            last_epoch_end[0] = time.perf_counter()

        # Validation after every epoch, on a copy of the architecture (the model being trained
        # keeps its mode and hooks); reads the weights, draws no random numbers.
        judge = copy.deepcopy(model).eval()
        val_curves: dict[int, dict[str, list[float]]] = {i: {"val_accuracy": [], "val_loss": []} for i in range(len(shards))}

        def validate(epoch: int, states: dict[int, dict]) -> None:
            for i, state in states.items():
                judge.load_state_dict(state)
                logits = predict_logits(judge, data.x_val)
                val_curves[i]["val_accuracy"].append(accuracy(logits, data.y_val))
                val_curves[i]["val_loss"].append(nll(logits, data.y_val))

        clock = ComputeClock(device)
        with clock.measure():
            states, histories = train_models(
                model, [init] * len(shards), shard_data, recipes, schedule,
                [cli.generator(batch_order_seed(base.seed, k), device) for k in shards], device,
                stack=stacked, compile=base.compile, on_epoch=report, after_epoch=validate,
            )

        for i, (k, tracker, state, history, shard) in enumerate(zip(shards, trackers, states, histories, shard_data)):
            curves = val_curves[i]
            val_acc = curves["val_accuracy"][-1]  # the final weights' (validated after the last epoch)
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
            write_csv(hist_csv, [{"epoch": e + 1, "loss": round(v, 6), "val_loss": round(curves["val_loss"][e], 6),
                                  "val_accuracy": round(curves["val_accuracy"][e], 6)} for e, v in enumerate(history)],
                      ["epoch", "loss", "val_loss", "val_accuracy"])
            tracker.log_history({"loss": history, **curves})  # val_accuracy's last step is the final value
            tracker.log_metrics({"compute_seconds": clock.seconds / len(shards)})  # trained together: a share each
            tracker.record_outputs([out, hist_csv])
            tracker.log_artifacts([hist_csv])
            print(f"mix_train: shard {k} ({len(shard)} samples, {mixer_name}, {cfg.loss.method}) val accuracy {val_acc:.4f}")


def recipe_for(cfg, num_classes: int, seed: int) -> MixRecipe:
    return MixRecipe(cfg.mixer_odds(), cfg.mix_alpha, num_classes, cfg.loss.method, cfg.loss.options,
                     cfg.label_smoothing, seed)


if __name__ == "__main__":
    cli.run("mix_train", main)
