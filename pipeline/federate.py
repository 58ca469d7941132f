"""Stage federate: rounds of federated or decentralised training on the K shards, from the
pretrained backbone, one global model per configured run.

A federated run (pipeline.train.rounds.run_round): each round samples a fraction of the K
clients (seeded by round), trains them from the global model with the run's client algorithm
(stacked when it can), aggregates them with any registered merger and takes the server step.
A decentralised run: every node trains on its shard, then one gossip step with the
topology's K x K mixing matrix; at the end (and, for the record, after every round) one
global merge of the nodes with ``final_merge``. Topology ``none`` is no communication at all:
the one-shot case, merged once.

After every round the run's state is checkpointed (pipeline.io.round_checkpoints); a run
killed at any moment and started again resumes from its last finished round and ends with the
same bytes as an uninterrupted run. Per-round metrics go to results/rounds.csv (a DVC plot, one line per run)
and to MLflow with step = round; the final global models go to data/federated/, are
registered, and join evaluate's table.
"""
from __future__ import annotations

import contextlib
import shutil
import time

import numpy as np
import torch

from pipeline.evaluation.metrics import accuracy
from pipeline.evaluation.rounds import client_drift, round_scores
from pipeline.nn.inference import predict_logits
from pipeline.io import layout
from pipeline.io.checkpoints import md5, replace_dir, save_tensors, staging_dir, write_csv
from pipeline.io.registration import register
from pipeline.io.round_checkpoints import checkpoint_path, fingerprint, load_round, save_round
from pipeline.io.stage_io import inherited_metadata, load_manifest, load_model, load_prepared, shard_tensors, source, split_digest
from pipeline.io.tracking import Tracker
from pipeline.methods.federated import TOPOLOGIES
from pipeline.methods.federated.topology import fits
from pipeline.methods.merge.data import MergeData
from pipeline.methods.mix.recipe import MixRecipe
from pipeline.nn.models import build
from pipeline.runtime import cli, config
from pipeline.runtime.progress import ComputeClock, Progress
from pipeline.train.combine import combine, merger_takes
from pipeline.train.loop import Schedule
from pipeline.train.rounds import Federation, RoundState, run_decentralised_round, run_round

ROUND_COLUMNS = ["run", "round", "test_accuracy", "val_accuracy", "test_loss", "val_loss", "mean_cosine",
                 "sign_conflict", "ensemble_gap", "clients", "node_test_accuracy"]


def draw_seed(seed: int, round_: int, client: int, stream: int) -> int:
    """One seed per (seed, round, client) and purpose (1: mixing draws, 2: batch order)."""
    return int(np.random.SeedSequence([seed, round_, client, stream]).generate_state(1)[0])


def check_topologies(cfg, k: int) -> None:
    """Refuse, before any computation, a topology that cannot serve K nodes."""
    for name, run in cfg.runs.items():
        if run.decentralised:
            why = fits(run.topology, k, {"peers": run.peers})
            if why:
                raise config.ConfigError(f"federate.runs.{name}.topology = {run.topology!r}: {why} (base.shards)")


def main(argv: list[str] | None = None) -> None:
    args = cli.parser("federate").parse_args(argv)
    base, cfg = config.load("federate", args.params)
    k = len(base.shards)
    check_topologies(cfg, k)
    device = cli.setup(base.seed, base.device, base.torch_threads)
    data = load_prepared(device, base.data_path)
    manifest = load_manifest()
    shards = [shard_tensors(data, manifest, i) for i in base.shards]
    sources = [source(data, x, y, device, base.loader_workers) for x, y in shards]
    sizes = [len(s) for s in sources]
    inputs = [layout.DATASET, layout.MANIFEST, layout.PRETRAINED]
    input_hashes = {str(f): md5(f) for f in inputs}
    model, pre_meta = load_model(layout.PRETRAINED, device)
    if cfg.start == "scratch":  # the same architecture, freshly initialised from base.seed
        torch.manual_seed(base.seed)
        arch = pre_meta["architecture"]
        model = build(arch["name"], arch["in_channels"], arch["num_classes"], arch["width"]).to(device)
    init = {n: t.clone() for n, t in model.state_dict().items()}
    num_classes = data.num_classes
    common = cfg.model_dump(exclude={"runs", "registered_model"})

    def recipe_for(client: int, round_: int) -> MixRecipe:
        return MixRecipe({cfg.mixer: 1.0}, cfg.mix_alpha, num_classes, "soft_ce", seed=draw_seed(base.seed, round_, client, 1))

    def generator_for(client: int, round_: int) -> torch.Generator:
        return cli.generator(draw_seed(base.seed, round_, client, 2), device)

    def schedule_of(round_: int) -> Schedule:
        return Schedule(cfg.local_epochs, cfg.batch_size, cfg.lr * cfg.lr_decay ** round_, cfg.momentum,
                        cfg.weight_decay, cosine=False, nesterov=False)

    def merge_data(clients: list[int]) -> MergeData:
        return MergeData(model, [shards[i] for i in clients], data.x_val, data.y_val, None, 256, base.seed)

    staged = staging_dir(layout.FEDERATED)
    all_rows, metas, outs = [], {}, []
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, staged, ignore_errors=True)  # gone if anything below fails
        for name, run in cfg.runs.items():
            spec = run.model_dump()
            print_ = fingerprint(base.model_dump(), common, spec, input_hashes, k)
            tracker = stack.enter_context(Tracker("federate", f"federate/{name}", params_file=args.params))
            tracker.log_params({"base": base.model_dump(), "federate": common, "run": spec, "name": name})
            producers = tracker.record_inputs(inputs)
            dataset_md5 = input_hashes[str(layout.DATASET)]
            for i in base.shards:
                tracker.log_dataset(f"shard_{i}", layout.MANIFEST,
                                    split_digest(dataset_md5, "train", manifest["shards"][i]["indices"]), "training")
            for split in ("validation", "test"):
                tracker.log_dataset(split, layout.DATASET, split_digest(dataset_md5, split), split)
            resumed = load_round(checkpoint_path(name), print_, device)
            state, rows = resumed if resumed else (fresh_state(run, init, k), [])
            if resumed:
                print(f"federate: {name}: resuming after round {state.round} of {cfg.rounds} ({checkpoint_path(name)})")
                for row in rows:
                    tracker.log_metrics(metric_values(row), step=row["round"])
            line = Progress(f"federate[{name}]", cfg.rounds, unit="round")
            clock = ComputeClock(device)
            while state.round < cfg.rounds:
                clock.start()
                started = time.perf_counter()
                if run.decentralised:
                    state, trained, start = decentralised_round(model, state, sources, recipe_for, generator_for,
                                                                schedule_of(state.round), run, init, sizes,
                                                                merge_data, base.seed, device)
                    sampled = list(range(k))
                else:
                    start = state.global_state
                    fed = Federation(run.algorithm, run.options, run.aggregator.method, run.aggregator.options,
                                     cfg.sample_fraction, run.server_lr, run.server_momentum, base.seed,
                                     run.server_optimizer, run.server_beta2, run.server_tau)
                    state, sampled, trained = run_round(model, state, sources, sizes, recipe_for, generator_for,
                                                        schedule_of(state.round), fed, device, data_for=merge_data)
                computed = time.perf_counter() - started
                if state.round % cfg.eval_every and state.round < cfg.rounds:
                    clock.stop()
                    save_round(checkpoint_path(name), state, rows, print_)
                    continue
                learned = [n for n, _ in model.named_parameters()]
                row = {"run": name, "round": state.round,
                       **round_scores(model, state.global_state, trained, data.x_val, data.y_val, data.x_test, data.y_test),
                       **client_drift(start, trained, learned), "clients": len(sampled),
                       # decentralised: the nodes' mean accuracy on their own, without the final merge
                       "node_test_accuracy": node_accuracy(model, state, data) if run.decentralised else ""}
                row = {c: (round(v, 6) if isinstance(v, float) else v) for c, v in row.items()}
                clock.stop()  # training and scoring the round; its checkpoint below is IO
                rows.append(row)
                save_round(checkpoint_path(name), state, rows, print_)
                tracker.log_metrics({**metric_values(row), "round_seconds": time.perf_counter() - started,
                                     "round_compute_seconds": computed}, step=state.round)
                line.update(state.round, row["val_loss"], test_acc=row["test_accuracy"])
            all_rows += rows
            metas[name] = {
                **inherited_metadata(pre_meta), "stage": "federate", "run": name, **spec, "rounds": cfg.rounds,
                "clients": k, "config": {"base": base.model_dump(), "federate": common},
                "inputs": input_hashes,
            }
            out = staged / f"{name}.safetensors"
            save_tensors(out, state.global_state, metas[name])
            tracker.log_metrics({"final_test_accuracy": rows[-1]["test_accuracy"],
                                 "final_val_accuracy": rows[-1]["val_accuracy"], "compute_seconds": clock.seconds})
            outs.append((name, tracker, producers, spec))
            print(f"federate: {name} ({describe(run)}) after {cfg.rounds} rounds: test accuracy "
                  f"{rows[-1]['test_accuracy']:.4f}")
        replace_dir(layout.FEDERATED, staged)
        write_csv(layout.ROUNDS_CSV, all_rows, ROUND_COLUMNS)
        for name, tracker, producers, spec in outs:
            path = layout.FEDERATED / f"{name}.safetensors"
            tracker.record_outputs([layout.ROUNDS_CSV])
            # The global model in a run of its own, nested under the training record, as merge's
            # models are: MLflow copies a run's params and step-0 metrics (system/* here) onto
            # every model logged in it.
            final = next(r for r in reversed(all_rows) if r["run"] == name)
            with tracker.nested(f"federate/{name}/global_model", {"mixmerge.role": "federated_model", "mixmerge.model": f"fed_{name}",
                                       "mixmerge.model_kind": "federated"}) as child:
                child.log_params({"run": name, **spec, "rounds": cfg.rounds, "clients": k})
                child.log_metrics({"final_test_accuracy": final["test_accuracy"],
                                   "final_val_accuracy": final["val_accuracy"]})
                child.record_outputs([path])
                child.describe(producers, heading=f"fed_{name}: {describe(cfg.runs[name])}, {cfg.rounds} rounds, from")
                if cfg.registered_model:
                    register(child, name, path, metas[name], cfg.registered_model, stage="federate")
    for name in cfg.runs:  # every run is in data/federated now: the checkpoints have served
        checkpoint_path(name).unlink(missing_ok=True)


def fresh_state(run, init: dict, k: int) -> RoundState:
    if run.decentralised:  # every node starts from the pretrained model
        return RoundState(0, init, client_states={i: dict(init) for i in range(k)})
    return RoundState(0, init)


def decentralised_round(model, state: RoundState, sources, recipe_for, generator_for, schedule: Schedule, run,
                        init: dict, sizes: list[int], merge_data, seed: int, device):
    """Local training on every node, one gossip step; the global model of the record is the
    final merge of the nodes as they stand."""
    k = len(sources)
    nodes = [state.client_states[i] for i in range(k)]
    start = {n: torch.stack([s[n].float() for s in nodes]).mean(0) for n in nodes[0]}
    mixing = TOPOLOGIES[run.topology](k, state.round, seed, **({"peers": run.peers} if run.topology == "random" else {}))
    trained, nodes = run_decentralised_round(model, nodes, state.round, sources, recipe_for, generator_for, schedule,
                                             mixing, device)
    weights = torch.tensor([float(s) for s in sizes])
    merged = combine(run.final_merge.method, nodes, init, weights / weights.sum(), run.final_merge.options,
                     data=merge_data(list(range(k))) if merger_takes(run.final_merge.method, "data") else None,
                     seed=seed)
    return RoundState(state.round + 1, merged, client_states=dict(enumerate(nodes))), trained, start


def node_accuracy(model, state: RoundState, data) -> float:
    scores = []
    for node in state.client_states.values():
        model.load_state_dict(node)
        scores.append(accuracy(predict_logits(model, data.x_test), data.y_test))
    model.load_state_dict(state.global_state)
    return sum(scores) / len(scores)


def metric_values(row: dict) -> dict[str, float]:
    return {c: v for c, v in row.items() if c not in ("run", "round") and isinstance(v, float) and v == v}


def describe(run) -> str:
    if run.decentralised:
        return f"decentralised, {run.topology}, final merge {run.final_merge.method}"
    options = ", ".join(f"{k}={v}" for k, v in run.options.items())
    server = ""
    if run.server_optimizer == "adam":
        server = f", server FedAdam lr {run.server_lr} b1 {run.server_momentum} b2 {run.server_beta2} tau {run.server_tau}"
    elif run.server_momentum or run.server_lr != 1.0:
        server = f", server lr {run.server_lr} momentum {run.server_momentum}"
    return f"{run.algorithm}{f' ({options})' if options else ''}, aggregator {run.aggregator.method}{server}"


if __name__ == "__main__":
    cli.run("federate", main)
