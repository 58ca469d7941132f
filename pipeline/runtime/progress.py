"""Training progress: one live line on an interactive terminal, a few lines in a log.

Hand-written rather than tqdm: tqdm writes a carriage-return stream into log files, and
we want at most ~5 lines per training run there.
"""
from __future__ import annotations

import contextlib
import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, label: str, total_epochs: int, stream: TextIO | None = None, start: float | None = None,
                 unit: str = "epoch"):
        self.label, self.total, self.unit = label, total_epochs, unit
        # stdout: progress is news, not a warning (the flow logs a stage's stderr as warnings)
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.start = time.perf_counter() if start is None else start  # a time.perf_counter() value
        # In a log: the first epoch, each quarter, and the last.
        self.log_epochs = {1, total_epochs} | {max(1, round(total_epochs * q / 4)) for q in (1, 2, 3)}

    def update(self, epoch: int, loss: float, **extra: float) -> None:
        elapsed = time.perf_counter() - self.start
        fields = " ".join(f"{k} {v:.4f}" for k, v in extra.items())
        line = f"{self.label} {self.unit} {epoch}/{self.total} loss {loss:.4f} {fields} {elapsed:.1f}s".replace("  ", " ")
        if self.tty:
            end = "\n" if epoch == self.total else ""
            self.stream.write(f"\r\033[K{line}{end}")
            self.stream.flush()
        elif epoch in self.log_epochs:
            print(line, file=self.stream, flush=True)


class ComputeClock:
    """The seconds a stage spends computing (decoding and partitioning, training, merging,
    evaluating), apart from its imports, file reads and writes and tracking calls. Stages
    report it as the metric ``compute_seconds``, so that everything else a run costs can be
    stated as a share of it (`python -m bench --only flow_overhead`)."""

    def __init__(self, device=None):
        self.seconds = 0.0
        self.cuda = getattr(device, "type", None) == "cuda"

    @contextlib.contextmanager
    def measure(self):
        self.start()
        try:
            yield
        finally:
            self.stop()

    def start(self) -> None:
        self._sync()
        self._started = time.perf_counter()

    def stop(self) -> None:
        self._sync()
        self.seconds += time.perf_counter() - self._started

    def _sync(self) -> None:
        if self.cuda:  # kernels run asynchronously: time them to their end
            import torch

            torch.cuda.synchronize()
