"""Shared entry-point plumbing: argument parsing, process set-up, exit code 2 on bad input."""
from __future__ import annotations

import argparse
import os
import random
import sys
from typing import Callable

import numpy as np
import torch

from pipeline.runtime.allocator import keep_freed_memory
from pipeline.runtime.tracking_env import bounded_tracking_waits, quiet_mlflow
from pipeline.io.errors import DataError, TrackingUnavailable
from pipeline.runtime.errors import ConfigError

EXIT_BAD_CONFIG = 2


def parser(stage: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m pipeline.{stage}")
    p.add_argument("--params", default="params.yaml", help="parameters file (default: params.yaml)")
    return p


EXIT_TRACKING_UNAVAILABLE = 75  # EX_TEMPFAIL: the tracking store is down; try again later


def run(stage: str, main: Callable[[list[str] | None], None], argv: list[str] | None = None) -> None:
    """Call a stage's main; a ConfigError or DataError becomes one line on stderr and exit 2."""
    quiet_mlflow()
    bounded_tracking_waits()
    try:
        main(argv)
    except (ConfigError, DataError) as e:
        print(f"{stage}: error: {e}", file=sys.stderr)
        sys.exit(EXIT_BAD_CONFIG)
    except TrackingUnavailable as e:
        print(f"{stage}: error: {e}", file=sys.stderr)
        sys.exit(EXIT_TRACKING_UNAVAILABLE)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def setup(seed: int, device: str, threads: int) -> torch.device:
    """Seed every RNG and fix the thread count, so CPU runs repeat bit for bit; keep freed
    CPU memory mapped (pipeline.runtime.allocator)."""
    keep_freed_memory()
    torch.set_num_threads(threads)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    dev = resolve_device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("base.device = 'cuda': no CUDA device is available; allowed: auto, cpu")
    # No torch.use_deterministic_algorithms: the CPU kernels used here are deterministic
    # already (tests/test_determinism.py checks byte-identical outputs), and the call
    # imports torch._inductor, about a second per stage process.
    return dev


def generator(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)
