"""Stage merge: combine the K experts into one model per configured merger, no training.

Each merged model gets its BatchNorm statistics recomputed on the training split (see
pipeline.nn.batchnorm for why), is written to data/merged/<name>.safetensors, logged to MLflow
as a pyfunc model (from code, weights as a safetensors artifact) and registered under
``merge.registered_model`` with the merger's name as alias.
"""
from __future__ import annotations

import contextlib
import shutil

import torch

from pipeline.runtime import cli, config
from pipeline.runtime.progress import ComputeClock
from pipeline.io import layout
from pipeline.nn.batchnorm import has_batchnorm, recalibrate
from pipeline.io.checkpoints import (check_finite, load_metadata, load_tensors, md5, replace_dir, save_tensors,
                                     staging_dir)
from pipeline.methods.merge.alignment import SPECS, align_experts
from pipeline.methods.merge.data import MergeData
from pipeline.methods.merge import MERGERS
from pipeline.train.combine import combine, merger_takes
from pipeline.evaluation.metrics import accuracy
from pipeline.io.stage_io import inherited_metadata, load_manifest, load_model, load_prepared, shard_tensors, split_digest
from pipeline.io.registration import register
from pipeline.io.tracking import Tracker
from pipeline.nn.inference import predict_logits


def check_mergers_accept(cfg, k: int) -> None:
    """Refuse, before any computation, a merger that cannot take K experts (slerp needs 2):
    a dry run on K empty state dicts exercises only the mergers' argument checks."""
    for name, spec in cfg.mergers.items():
        if merger_takes(spec.method, "data"):
            continue  # they take any K >= 1; a dry run would need the data
        try:
            MERGERS[spec.method]([{} for _ in range(k)], {}, torch.full((k,), 1.0 / k), **spec.options)
        except ValueError as e:
            raise config.ConfigError(f"merge.mergers.{name} ({spec.method}) with {k} experts: {e}") from None


def main(argv: list[str] | None = None) -> None:
    args = cli.parser("merge").parse_args(argv)
    base, cfg = config.load("merge", args.params)
    device = cli.setup(base.seed, base.device, base.torch_threads)
    data = load_prepared(device, base.data_path)
    expert_files = [layout.expert(k) for k in base.shards]
    missing = [str(f) for f in expert_files if not f.exists()]
    if missing:
        raise config.ConfigError(f"base.shards = {base.shards}: expert checkpoints missing: {', '.join(missing)}")
    check_mergers_accept(cfg, len(expert_files))
    arch = load_metadata(layout.PRETRAINED)["architecture"]["name"] if layout.PRETRAINED.exists() else None
    if cfg.align == "weight_matching" and arch not in SPECS:
        raise config.ConfigError(f"merge.align = 'weight_matching': no permutation spec for architecture {arch!r}; "
                                 f"supported: {', '.join(SPECS)} (or align: none)")

    with Tracker("merge", "merge", params_file=args.params) as tracker, contextlib.ExitStack() as stack:
        tracker.log_params({"base": base.model_dump(), "merge": cfg.model_dump()})
        inputs = [layout.DATASET, layout.MANIFEST, layout.PRETRAINED, *expert_files]
        producers = tracker.record_inputs(inputs)
        dataset_md5 = md5(layout.DATASET)
        tracker.log_dataset("validation", layout.DATASET, split_digest(dataset_md5, "validation"), "validation")

        model, base_meta = load_model(layout.PRETRAINED, device)
        base_state = {k: v.clone() for k, v in model.state_dict().items()}
        loaded = [load_tensors(f, device) for f in expert_files]
        for f, (state, _) in zip(expert_files, loaded):  # written before the check existed, or by hand
            check_finite(state, str(f))
        experts = [state for state, _ in loaded]
        sizes = torch.tensor([meta["shard_size"] for _, meta in loaded], dtype=torch.float32)
        weights = sizes / sizes.sum()
        realigned = [False] * len(experts)
        if cfg.align == "weight_matching":
            experts, realigned = align_experts(arch, base_state, experts, seed=base.seed)
            print(f"merge: weight matching to the pretrained model permuted experts {[i for i, m in enumerate(realigned) if m]}")
        manifest = load_manifest()
        recal = cfg.bn_recalibration and has_batchnorm(model)
        merge_data = MergeData(model, [shard_tensors(data, manifest, k) for k in base.shards], data.x_val, data.y_val,
                               data.x_train if recal else None, cfg.bn_batch_size, base.seed)

        staged = staging_dir(layout.MERGED)
        val_acc, metas = {}, {}
        stack.callback(shutil.rmtree, staged, ignore_errors=True)  # gone if anything below fails
        clock = ComputeClock(device)
        for name, spec in cfg.mergers.items():
            clock.start()
            merged = combine(spec.method, experts, base_state, weights, spec.options, data=merge_data,
                             seed=base.seed)
            model.load_state_dict(merged)
            if recal:
                recalibrate(model, data.x_train, cfg.bn_batch_size)
            val_acc[name] = accuracy(predict_logits(model, data.x_val), data.y_val)
            clock.stop()
            metas[name] = {
                **inherited_metadata(base_meta),
                "stage": "merge",
                "merger": name,
                "method": spec.method,
                "options": spec.options,
                "bn_recalibrated": recal,
                "aligned": cfg.align,
                "permuted_experts": [i for i, m in enumerate(realigned) if m],
                **({"chosen": merge_data.notes[spec.method]} if spec.method in merge_data.notes else {}),
                "expert_weights": [round(w, 8) for w in weights.tolist()],
                "inputs": {str(f): md5(f) for f in inputs},
            }
            save_tensors(staged / f"{name}.safetensors", model.state_dict(), metas[name])
        replace_dir(layout.MERGED, staged)
        tracker.log_metrics({"compute_seconds": clock.seconds})

        for name, spec in cfg.mergers.items():
            # One run per merged model, nested under this one: its params, its validation
            # accuracy and its logged model are its own (MLflow copies a run's params and
            # metrics onto every model logged in it), and evaluate's lineage finds it.
            path = layout.MERGED / f"{name}.safetensors"
            with tracker.nested(f"merge/{name}", {"mixmerge.role": "merged_model", "mixmerge.model": name,
                                       "mixmerge.model_kind": "merged"}) as child:
                child.log_params({"merger": name, "method": spec.method, "options": spec.options,
                                  "align": cfg.align, "bn_recalibration": recal, "experts": len(experts)})
                child.log_metrics({"val_accuracy": val_acc[name]})
                child.record_outputs([path])
                child.describe(producers, heading=f"{name} ({spec.method}) merged from")
                if cfg.registered_model:
                    register(child, name, path, metas[name], cfg.registered_model, stage="merge")
    table = ", ".join(f"{n} {a:.4f}" for n, a in val_acc.items())
    print(f"merge: {len(experts)} experts -> {len(val_acc)} merged models (BN recomputed: {recal}); val accuracy {table}")


if __name__ == "__main__":
    cli.run("merge", main)
