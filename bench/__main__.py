"""Speed benchmarks. Every figure is a ratio against a baseline timed side by side in the same
process, after a warm-up, best of `--repeats`. Prints a table and writes JSON.

    python -m bench                     # all rows on the default device (CUDA if present)
    python -m bench --only merge mlflow # some rows
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.runtime.allocator import keep_freed_memory
from pipeline.methods.pretrain.augment import random_affine
from pipeline.train.data_path import BatchSource
from pipeline.methods.merge import MERGERS
from pipeline.methods.mix.losses import soft_cross_entropy
from pipeline.methods.mix.mixers import MIXERS
from pipeline.nn.models import build, channels_last
from pipeline.train.stacked import fit_stacked
from pipeline.nn.inference import autocast
from pipeline.train.loop import Schedule, batches, fit
from bench.rounds import bench_aggregation, bench_round_overhead, bench_rounds_stacked
from bench.cluster_lab import bench_pool
from bench.startup import bench_flow_overhead, bench_imports, bench_sweep_cell, bench_sweep_throughput


def best_of(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    fn()  # warm-up: allocations, kernels, caches
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def row(name, baseline, candidate, b_time, c_time, target, unit="s", note="", cost=False):
    """One result. By default ``ratio`` = baseline / candidate time ("candidate is N x faster");
    with ``cost`` it is candidate / baseline ("candidate takes N x the baseline's time"), the
    form the targets of those rows are written in."""
    ratio = c_time / b_time if cost else b_time / c_time
    reading = f"{ratio:.2f}x the time" if cost else f"{ratio:.2f}x faster"
    return {"row": name, "baseline": baseline, "candidate": candidate, "baseline_value": b_time,
            "candidate_value": c_time, "unit": unit, "ratio": ratio, "reading": reading, "target": target,
            "note": note}


def bench_experts(device, repeats, k=8, n=256, epochs=2, width=16, batch_size=64):
    """K experts fine-tuned together (stacked, vmapped) vs one after another, same process."""
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(n, 1, 8, 8, generator=g).to(device), torch.randint(0, 10, (n,), generator=g).to(device))
            for _ in range(k)]
    init = copy.deepcopy(build("small_cnn", 1, 10, width).state_dict())
    schedule = Schedule(epochs, batch_size, 0.02)
    mix = MIXERS["mixup"]

    def one_by_one():
        for i, (x, y) in enumerate(data):
            model = channels_last(build("small_cnn", 1, 10, width).to(device))  # as the engine trains one by one
            model.load_state_dict(init)
            model.train()
            rng = np.random.default_rng(i)
            fit(model.parameters(), lambda xb, yb: _mixed_loss(model, mix, xb, yb, rng), BatchSource(x, y, device),
                schedule, torch.Generator(device).manual_seed(i), device)

    def stacked():
        rngs = [np.random.default_rng(i) for i in range(k)]
        fit_stacked(build("small_cnn", 1, 10, width), [init] * k, [BatchSource(x, y, device) for x, y in data],
                    lambda i, x, y: mix(x, y, 10, 1.0, rngs[i]), soft_cross_entropy, schedule,
                    [torch.Generator(device).manual_seed(i) for i in range(k)], device)

    t_seq, t_stk = best_of(one_by_one, repeats, device), best_of(stacked, repeats, device)
    target = ">= 3x on a GPU" if device.type == "cuda" else ">= 1x (no slower) on CPU"
    return row(f"K={k} experts trained", "one after another", "stacked (vmap)", t_seq, t_stk, target,
               note=f"small_cnn width {width}, {n} samples/expert, batch {batch_size}, {epochs} epochs, mixup")


def _mixed_loss(model, mix, x, y, rng):
    xm, ym = mix(x, y, 10, 1.0, rng)
    return soft_cross_entropy(model(xm), ym)


def bench_data_path(device, repeats, n=4096, batch_size=256, width=8, shape=(3, 32, 32), label="CIFAR-sized"):
    """Device-resident tensors + batched augmentation vs DataLoader + per-sample torchvision
    transforms, same model, batch size and augmentation family (random affine). The lighter
    the model per image, the more of each step the data path is: the default experiment's
    digits shape shows that end, CIFAR-sized images with a small CNN the other."""
    from torch.utils.data import DataLoader, Dataset
    from torchvision.transforms import v2

    g = torch.Generator().manual_seed(0)
    x_cpu = torch.rand(n, *shape, generator=g)
    y_cpu = torch.randint(0, 10, (n,), generator=g)
    model = channels_last(build("small_cnn", shape[0], 10, width).to(device))  # as the stages
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def step(xb, yb):
        with autocast(device):
            loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    class Augmented(Dataset):
        transform = v2.RandomAffine(degrees=10, translate=(0.125, 0.125), scale=(0.9, 1.1))

        def __len__(self):
            return n

        def __getitem__(self, i):
            return self.transform(x_cpu[i]), y_cpu[i]

    loader = DataLoader(Augmented(), batch_size=batch_size, shuffle=True, drop_last=True)

    def dataloader_epoch():
        for xb, yb in loader:
            step(xb.to(device, non_blocking=True), yb.to(device, non_blocking=True))

    x_dev, y_dev = x_cpu.to(device), y_cpu.to(device)
    gen = torch.Generator(device).manual_seed(0)

    def resident_epoch():
        for idx in batches(n, batch_size, gen, device):
            if len(idx) == batch_size:
                step(random_affine(x_dev[idx], gen), y_dev[idx])

    t_dl, t_res = best_of(dataloader_epoch, repeats, device), best_of(resident_epoch, repeats, device)
    target = ">= 5x on a GPU" if device.type == "cuda" else ">= 1.5x on CPU"
    return row(f"training images/s, {label}", "DataLoader + v2.RandomAffine", "device tensors + batched affine",
               t_dl, t_res, target, unit="s per epoch",
               note=f"{n / t_dl:.0f} vs {n / t_res:.0f} img/s; small_cnn width {width}, "
                    f"{'x'.join(map(str, shape[::-1]))}, batch {batch_size}")


def bench_data_path_digits(device, repeats):
    """The data-path row at the default experiment's shapes: digits 8x8x1, small_cnn width 16,
    mix_train's batch of 32."""
    return bench_data_path(device, repeats, n=2048, batch_size=32, width=16, shape=(1, 8, 8), label="digits")


def copy_bandwidth(device, repeats, mib=512) -> float:
    """Measured memory-copy bandwidth in bytes/s (read + write)."""
    src = torch.empty(mib * 2**20 // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = best_of(lambda: dst.copy_(src), repeats, device)
    return 2 * src.numel() * 4 / t


def resnet18_copies(device, k: int):
    """A ResNet-18 state, K slightly perturbed copies of it, uniform weights and one model's
    bytes: the inputs of the merging and aggregation rows."""
    torch.manual_seed(0)
    base = {n: t.to(device) for n, t in build("resnet18_cifar", 3, 10, 64).state_dict().items()}
    copies = [{n: t + 0.01 * torch.randn_like(t) if t.is_floating_point() else t for n, t in base.items()}
              for _ in range(k)]
    return base, copies, torch.full((k,), 1.0 / k), sum(t.numel() * t.element_size() for t in base.values())


def bench_merge(device, repeats, k=8):
    """TIES and DARE vs a plain average of the same K ResNet-18 checkpoints, and the share of
    the machine's copy bandwidth each achieves (bytes read + written / time)."""
    base, experts, weights, model_bytes = resnet18_copies(device, k)
    t_avg = best_of(lambda: MERGERS["uniform"](experts, base, weights), repeats, device)
    bw = copy_bandwidth(device, repeats)
    averaged = (k + 1) * model_bytes  # K experts read, one model written
    rows = []
    for name, options in [("ties", {"density": 0.2}), ("dare", {"density": 0.5})]:
        t = best_of(lambda: MERGERS[name](experts, base, weights, **options), repeats, device)
        moved = averaged + model_bytes  # the base is read too
        out = row(f"merge K={k} ResNet-18", "uniform average", f"{name.upper()} (density {options['density']})",
                  t_avg, t, "<= 3x the time; >= 10% of copy bandwidth", cost=True,
                  note=f"{model_bytes / 2**20:.0f} MiB per model; copy bandwidth {bw / 1e9:.1f} GB/s; "
                       f"average at {averaged / t_avg / bw:.0%}, {name.upper()} at {moved / t / bw:.0%} of it")
        out["bandwidth_share_average"] = averaged / t_avg / bw
        out[f"bandwidth_share_{name}"] = moved / t / bw
        rows.append(out)
    return rows


def bench_mlflow(device, repeats, steps=300):
    """Per-epoch metrics sent in one log_batch vs one log_metric call per step (SQLite store)."""
    import logging
    import os

    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    logging.getLogger("alembic").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        client = MlflowClient(f"sqlite:///{tmp}/bench.db")
        exp = client.create_experiment("bench")

        def per_step():
            run = client.create_run(exp).info.run_id
            for s in range(steps):
                client.log_metric(run, "loss", 1.0 / (s + 1), step=s)

        def batched():
            run = client.create_run(exp).info.run_id
            now = int(time.time() * 1000)
            client.log_batch(run, metrics=[Metric("loss", 1.0 / (s + 1), now, s) for s in range(steps)])

        t_step, t_batch = best_of(per_step, repeats, torch.device("cpu")), best_of(batched, repeats, torch.device("cpu"))
    return row(f"MLflow, {steps} step metrics", "one call per step", "one log_batch", t_step, t_batch,
               ">= 10x less logging time")


def bench_dvc(device, repeats):
    """`dvc repro` on this (up-to-date) project vs `dvc --version`."""
    dvc = [sys.executable, "-m", "dvc"]
    status = subprocess.run(dvc + ["status", "--json"], capture_output=True, text=True)
    if status.returncode != 0 or json.loads(status.stdout or "{}"):
        return {"row": "dvc repro, up to date", "skipped": "the pipeline is not up to date: run `dvc repro` first"}
    cpu = torch.device("cpu")
    t_ver = best_of(lambda: subprocess.run(dvc + ["--version"], capture_output=True, check=True), repeats, cpu)
    t_repro = best_of(lambda: subprocess.run(dvc + ["repro"], capture_output=True, check=True), repeats, cpu)
    return row("dvc repro, up to date", "dvc --version", "dvc repro", t_ver, t_repro, "<= 3x the time",
               note=f"{t_repro:.2f} s vs {t_ver:.2f} s", cost=True)


def bench_flow(device, repeats, rounds=2):
    """The Prefect flow vs the same stage commands run directly, one after another, on a tiny
    config with K=1 (so the flow gains nothing from concurrency). The temporary Prefect
    server's start is timed apart, with a trivial flow before the measured ones. Each round
    runs both on fresh copies of the project, alternating; the ratio takes the best of each,
    and the note gives every round's overhead, because on 2 cores the server's background
    work makes single runs vary by seconds."""
    import os

    from prefect import flow

    from bench.workspace import make_project
    from flows.dvc_commands import layers, stage_env
    from flows.pipeline_flow import mixmerge_pipeline

    tiny = {"base.shards": [0], "pretrain.epochs": 2, "pretrain.width": 8, "mix_train.epochs": 2,
            "prepare.partition.method": "iid"}

    @flow
    def hello():
        return 1

    start = time.perf_counter()
    hello()
    t_server = time.perf_counter() - start
    env = {k: v for k, v in stage_env().items() if k != "MLFLOW_TRACKING_URI"}
    saved = os.environ.pop("MLFLOW_TRACKING_URI", None)
    directs, flows = [], []
    try:
        for r in range(rounds):
            with tempfile.TemporaryDirectory() as tmp:
                direct_root = make_project(Path(tmp) / "direct", tiny)
                flow_root = make_project(Path(tmp) / "flow", tiny)
                stages = [s for layer in layers(direct_root) for s in layer]
                start = time.perf_counter()
                for s in stages:
                    subprocess.run(s.cmd, shell=True, cwd=direct_root, env=env, check=True, capture_output=True)
                directs.append(time.perf_counter() - start)
                start = time.perf_counter()
                mixmerge_pipeline(project_dir=str(flow_root))
                flows.append(time.perf_counter() - start)
    finally:
        if saved is not None:
            os.environ["MLFLOW_TRACKING_URI"] = saved
    t_direct, t_flow = min(directs), min(flows)
    per_stage = (t_flow - t_direct) / len(stages)
    rounds_note = ", ".join(f"{(f - d) / len(stages):+.2f}" for d, f in zip(directs, flows))
    out = row(f"flow, {len(stages)} stages (tiny)", "stage commands run directly", "Prefect flow",
              t_direct, t_flow, "adds <= max(10%, 0.5 s) per stage", cost=True,
              note=f"flow adds {per_stage:+.2f} s per stage ({t_flow / t_direct - 1:+.0%}), best of {rounds}; "
                   f"per round {rounds_note} s; temporary server start {t_server:.1f} s, not included")
    out.update({"overhead_per_stage_s": per_stage, "server_start_s": t_server,
                "direct_s": directs, "flow_s": flows})
    return out


def bench_gpu_utilisation(device, repeats, k=8, batch_size=512, width=64):
    """Achieved FLOP/s during stacked mix_train steps, as a share of the GPU's bf16 peak."""
    if device.type != "cuda":
        return {"row": "mix_train FLOP/s share of peak", "skipped": "no CUDA device here: run on a GPU machine"}
    from torch.utils.flop_counter import FlopCounterMode

    peaks = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12}  # dense bf16, vendor figures
    name = torch.cuda.get_device_name()
    peak = next((v for key, v in peaks.items() if key in name), None)
    n = batch_size * 4
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(n, 3, 32, 32, generator=g).to(device), torch.randint(0, 10, (n,), generator=g).to(device))
            for _ in range(k)]
    init = copy.deepcopy(build("small_cnn", 3, 10, width).state_dict())
    rngs = [np.random.default_rng(i) for i in range(k)]

    def epoch():
        fit_stacked(build("small_cnn", 3, 10, width), [init] * k, [BatchSource(x, y, device) for x, y in data],
                    lambda i, x, y: MIXERS["mixup"](x, y, 10, 1.0, rngs[i]), soft_cross_entropy,
                    Schedule(1, batch_size, 0.02), [torch.Generator(device).manual_seed(i) for i in range(k)], device)

    with FlopCounterMode(display=False) as counter:
        epoch()
    t = best_of(epoch, repeats, device)
    achieved = counter.get_total_flops() / t
    return {"row": "mix_train FLOP/s share of peak", "baseline": f"{name} bf16 peak", "candidate": "stacked epoch",
            "baseline_value": peak, "candidate_value": achieved, "unit": "FLOP/s",
            "ratio": achieved / peak if peak else float("nan"), "target": ">= 20% of peak",
            "reading": f"{achieved / peak:.0%} of peak" if peak else "peak unknown",
            "note": f"{achieved / 1e12:.1f} TFLOP/s, K={k}, small_cnn width {width}, batch {batch_size}"}


ROWS = {"experts": bench_experts, "data": bench_data_path, "data_digits": bench_data_path_digits,
        "merge": bench_merge, "mlflow": bench_mlflow,
        "dvc": bench_dvc, "flow": bench_flow, "gpu": bench_gpu_utilisation,
        "rounds_stacked": bench_rounds_stacked, "round_overhead": bench_round_overhead,
        "aggregation": bench_aggregation, "flow_overhead": bench_flow_overhead, "sweep_cell": bench_sweep_cell,
        "sweep_throughput": bench_sweep_throughput, "imports": bench_imports, "pool": bench_pool}


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="+", choices=sorted(ROWS), help="rows to run (default: all)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", default="bench-results/bench.json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    kept = keep_freed_memory()  # as every stage process does (pipeline.runtime.cli.setup)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          args.device if args.device != "auto" else "cpu")
    machine = {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
               "torch_threads": torch.get_num_threads(), "malloc": "keeps freed memory" if kept else "system default",
               "torch": torch.__version__, "python": platform.python_version()}
    results = []
    for name in args.only or list(ROWS):
        print(f"... {name}", file=sys.stderr, flush=True)
        result = ROWS[name](device, args.repeats)
        results.extend(result if isinstance(result, list) else [result])
    print(f"\nmachine: {machine}\n")
    print(f"{'row':<32}{'baseline':<30}{'candidate':<32}{'measured':<18}target")
    for r in results:
        if "skipped" in r:
            print(f"{r['row']:<32}skipped: {r['skipped']}")
            continue
        print(f"{r['row']:<32}{r['baseline']:<30}{r['candidate']:<32}{r['reading']:<18}{r['target']}")
        if r.get("note"):
            print(f"{'':<32}{r['note']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "rows": results}, indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
