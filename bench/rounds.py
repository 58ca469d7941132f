"""Benchmark rows of federated rounds (python -m bench --only rounds_stacked round_overhead aggregation)."""
from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch

from pipeline.evaluation.rounds import client_drift, round_scores
from pipeline.methods.mix.recipe import MixRecipe
from pipeline.nn.models import build
from pipeline.train.data_path import BatchSource
from pipeline.train.loop import Schedule
from pipeline.train.rounds import Federation, RoundState, run_round


def _clients(k: int, n: int, device) -> list[BatchSource]:
    g = torch.Generator().manual_seed(0)
    return [BatchSource(torch.randn(n, 1, 8, 8, generator=g).to(device), torch.randint(0, 10, (n,), generator=g).to(device),
                        device) for _ in range(k)]


def _round(model, init, data, fed, schedule, device, stack):
    recipe_for = lambda c, r: MixRecipe({"none": 1.0}, 1.0, 10, "soft_ce", seed=c)  # noqa: E731
    generator_for = lambda c, r: torch.Generator(device).manual_seed(c)  # noqa: E731
    return run_round(model, RoundState(0, init), data, [len(d) for d in data], recipe_for, generator_for, schedule,
                     fed, device, stack=stack)


def bench_rounds_stacked(device, repeats, width=16, n=64):
    """One round of K small clients (64 digits-sized images each, E = 1, batch 32): trained
    stacked (one vmapped step for all) vs one after another in one process (the authors'
    repositories' loop), K = 20 and K = 100, FedAvg and FedNTD (an output-space term)."""
    from bench.__main__ import best_of, row

    model = build("small_cnn", 1, 10, width).to(device)
    init = copy.deepcopy(model.state_dict())
    schedule = Schedule(1, 32, 0.05, cosine=False, nesterov=False)
    rows = []
    for k in (20, 100):
        data = _clients(k, n, device)
        for algorithm in ("fedavg", "fedntd"):
            fed = Federation(client_algorithm=algorithm, sample_fraction=1.0)
            one = best_of(lambda: _round(model, init, data, fed, schedule, device, False), repeats, device)
            stacked = best_of(lambda: _round(model, init, data, fed, schedule, device, True), repeats, device)
            rows.append(row(f"round K={k} {algorithm}", "one client after another", "clients stacked (vmap)",
                            one, stacked, ">= 1x on CPU; 5x on a GPU",
                            note=f"{n} images per client, width {width}; {one / k * 1e3:.1f} ms per client one by one"))
    return rows


def bench_round_overhead(device, repeats):
    """At the default sizes (scikit-learn's digits, K = 4 shards, E = 1, batch 32, width 16):
    what a round spends beside training and aggregating (sampling, the per-round metrics,
    the checkpoint) as a share of the whole round."""
    from sklearn.datasets import load_digits

    from bench.__main__ import best_of, row
    from pipeline.io.round_checkpoints import save_round

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8).div(16).to(device)
    y = torch.tensor(y).to(device)
    n_train = int(0.65 * len(y))
    shards = torch.arange(n_train).chunk(4)
    data = [BatchSource(x[s], y[s], device) for s in shards]
    val, test = slice(n_train, n_train + 270), slice(n_train + 270, None)
    model = build("small_cnn", 1, 10, 16).to(device)
    init = copy.deepcopy(model.state_dict())
    schedule = Schedule(1, 32, 0.02, cosine=False, nesterov=False)
    fed = Federation(client_algorithm="fedavg", sample_fraction=1.0)
    state, sampled, trained = _round(model, init, data, fed, schedule, device, None)
    learned = [n for n, _ in model.named_parameters()]
    with tempfile.TemporaryDirectory() as tmp:
        def metrics():
            return [{**round_scores(model, state.global_state, trained, x[val], y[val], x[test], y[test]),
                     **client_drift(init, trained, learned)}]

        rows = metrics()
        compute = best_of(lambda: _round(model, init, data, fed, schedule, device, None), repeats, device)
        scoring = best_of(metrics, repeats, device)
        checkpoint = best_of(lambda: save_round(Path(tmp) / "round.safetensors", state, rows, "bench"), repeats, device)
    extra = scoring + checkpoint
    share = extra / (compute + extra)
    every5 = (scoring / 5 + checkpoint) / (compute + scoring / 5 + checkpoint)  # federate.eval_every: 5
    out = row("round overhead (digits, K=4)", "training + aggregation", "metrics + checkpoint", compute, extra,
              "<= 10% of the round", cost=True,
              note=f"overhead is {share:.1%} of a round of {(compute + extra) * 1e3:.0f} ms with metrics every "
                   f"round ({scoring * 1e3:.1f} ms metrics, {checkpoint * 1e3:.1f} ms checkpoint), {every5:.1%} "
                   f"with eval_every 5")
    out["overhead_share"] = share
    return out


def bench_aggregation(device, repeats, k=20):
    """FedAvg of K ResNet-18 clients (the aggregator every round runs) vs the machine's copy
    bandwidth: bytes read (K clients) + written (one model) per second, as a share."""
    from bench.__main__ import best_of, copy_bandwidth, resnet18_copies, row
    from pipeline.train.combine import combine

    base, clients, weights, model_bytes = resnet18_copies(device, k)
    moved = (k + 1) * model_bytes
    bw = copy_bandwidth(device, repeats)
    copy_time = moved / bw  # the time the bytes take at copy bandwidth
    t = best_of(lambda: combine("fedavg", clients, base, weights), repeats, device)
    out = row(f"aggregate K={k} ResNet-18", "copy of the same bytes", "FedAvg aggregation", copy_time, t,
              ">= 50% of copy bandwidth", cost=True,
              note=f"{model_bytes / 2**20:.0f} MiB per model; copy bandwidth {bw / 1e9:.1f} GB/s; "
                   f"aggregation at {moved / t / bw:.0%} of it")
    out["bandwidth_share"] = moved / t / bw
    return out


