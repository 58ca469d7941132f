"""Every merger of this checkout against the same merger at another git revision, side by side
in one process, on K ResNet-18 checkpoints: the before/after figure for a change to
pipeline/merging.py.

    python -m bench.merge_ab --against 6b47493 --threads 2
"""
from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from pipeline.allocator import keep_freed_memory
from pipeline.merging import MERGERS
from pipeline.models import build

# Mergers that need no data; options as in the merge row of `python -m bench`.
OPTIONS = {"uniform": {}, "task_arithmetic": {}, "ties": {"density": 0.2}, "dare": {"density": 0.5},
           "dare_ties": {"density": 0.5}, "breadcrumbs": {}, "model_stock": {}, "pcb": {}}


def mergers_at(revision: str, folder: Path):
    """The MERGERS registry of pipeline/merging.py as it was at ``revision``."""
    source = subprocess.run(["git", "show", f"{revision}:pipeline/merging.py"], capture_output=True, text=True,
                            check=True).stdout
    path = folder / "merging_at_revision.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("merging_at_revision", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.MERGERS


def best_of(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.merge_ab", description=__doc__.split("\n\n")[0])
    p.add_argument("--against", required=True, help="git revision to compare with")
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2, help="alternations of the two versions")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()
    torch.manual_seed(0)
    base = build("resnet18_cifar", 3, 10, 64).state_dict()
    experts = [{n: t + 0.01 * torch.randn_like(t) if t.is_floating_point() else t for n, t in base.items()}
               for _ in range(args.k)]
    weights = torch.full((args.k,), 1.0 / args.k)
    with tempfile.TemporaryDirectory() as tmp:
        before = mergers_at(args.against, Path(tmp))
        print(f"{'merger':<16}{args.against + ' (s)':>16}{'now (s)':>10}{'speed-up':>10}")
        for round_ in range(args.rounds):
            for name, options in OPTIONS.items():
                if name not in before:
                    continue
                t_before = best_of(lambda: before[name](experts, base, weights, **options), args.repeats)
                t_now = best_of(lambda: MERGERS[name](experts, base, weights, **options), args.repeats)
                print(f"{name:<16}{t_before:>16.3f}{t_now:>10.3f}{t_before / t_now:>9.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
