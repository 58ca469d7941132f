"""Every merger of this checkout against the same merger at another git revision, side by side
in one process, on K ResNet-18 checkpoints: the before/after figure for a change to a merger
(pipeline/methods/merge/).

    python -m bench.merge_ab --against 6b47493 --threads 2
"""
from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

from pipeline.runtime.allocator import keep_freed_memory
from pipeline.methods.merge import MERGERS
from pipeline.nn.models import build

# Mergers that need no data; options as in the merge row of `python -m bench`.
OPTIONS = {"uniform": {}, "task_arithmetic": {}, "ties": {"density": 0.2}, "dare": {"density": 0.5},
           "dare_ties": {"density": 0.5}, "breadcrumbs": {}, "model_stock": {}, "pcb": {}}


def mergers_at(revision: str, folder: Path):
    """The MERGERS registry of the ``pipeline`` package as it was at ``revision``, imported
    beside this checkout's: the current ``pipeline`` modules are set aside in sys.modules while
    the old tree imports, then put back (each function keeps its own module's globals)."""
    archive = folder / "pipeline.tar"
    subprocess.run(["git", "archive", "--output", str(archive), revision, "pipeline"], check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(folder, filter="data")
    ours = {n: m for n, m in sys.modules.items() if n == "pipeline" or n.startswith("pipeline.")}
    for n in ours:
        del sys.modules[n]
    sys.path.insert(0, str(folder))
    try:
        for name in ("pipeline.methods.merge", "pipeline.methods.merge"):  # the layout after and before the packages
            try:
                return importlib.import_module(name).MERGERS
            except ModuleNotFoundError:
                continue
        raise SystemExit(f"no merger registry found at {revision}")
    finally:
        sys.path.remove(str(folder))
        for n in [n for n in sys.modules if n == "pipeline" or n.startswith("pipeline.")]:
            del sys.modules[n]
        sys.modules.update(ours)


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
