"""DARE's random keep masks: one per expert per tensor, reproducible from (seed, tensor name).

Drawing the masks is most of a DARE merge on a CPU, so they are drawn for speed:
- numpy's SFC64 bit generator, not torch's CPU generator: ``random_raw`` gives a 64-bit word
  in about half the time torch's mt19937 takes (1.1 vs 2.4 ms for 0.6 M words, 2-core CPU);
- each 64-bit word is four 16-bit uniforms, so the keep probability is ``density`` rounded
  to a multiple of 2^-16, and rescaling by 1/q (not 1/density) keeps DARE unbiased;
- a tensor is cut into fixed chunks of ``CHUNK`` entries, each with a stream of its own,
  drawn in parallel threads (numpy releases the GIL while it draws and compares).

Because the streams belong to chunks, not to threads, and are drawn on the host, the masks
are the same whatever the thread count and whatever device the merge runs on.
"""
from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import numpy as np
import torch

LEVELS = 1 << 16  # 16-bit uniforms: keep probabilities are multiples of 2^-16
CHUNK = 1 << 16  # entries per stream: small, so that chunks share out evenly between threads


def keep_probability(density: float) -> float:
    """``density`` as DARE applies it: rounded to a multiple of 2^-16, at least 2^-16."""
    return max(1, round(density * LEVELS)) / LEVELS


@lru_cache(maxsize=None)
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(workers, thread_name_prefix="drop-masks")


class DropMasks:
    """Keep masks for one tensor of ``numel`` entries: ``next()`` gives expert 0's, then expert
    1's, and so on, each a flat float32 tensor of 0s and 1s on the host, 1 with probability
    ``self.q``. Float, not bool: torch's ``mul`` by a bool tensor first copies it to float,
    a pass that the drawing threads do for free while they compare."""

    def __init__(self, seed: int, key: str, numel: int, density: float):
        self.numel, self.q = numel, keep_probability(density)
        self._below = round(self.q * LEVELS) - LEVELS // 2  # uniform int16 < this: kept
        root = int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:16], "little")
        self._chunks = [(start, min(start + CHUNK, numel)) for start in range(0, numel, CHUNK)]
        self._streams = [np.random.SFC64(np.random.SeedSequence(root, spawn_key=(i,)))
                         for i in range(len(self._chunks))]

    def next(self) -> torch.Tensor:
        if self.q == 1:  # density 1: nothing to drop, nothing to draw
            return torch.ones(self.numel)
        keep = np.empty(self.numel, dtype=np.float32)

        def draw(chunks: range) -> None:
            for i in chunks:
                start, end = self._chunks[i]
                words = self._streams[i].random_raw((end - start + 3) // 4)
                np.less(words.view(np.int16)[: end - start], self._below, out=keep[start:end])

        # One task per thread, each a run of whole chunks: a chunk's stream never depends on
        # which thread draws it.
        count = len(self._chunks)
        workers = min(torch.get_num_threads(), count)
        runs = [range(count * w // workers, count * (w + 1) // workers) for w in range(workers)]
        if workers > 1:
            list(_pool(workers).map(draw, runs))
        else:
            draw(runs[0])
        return torch.from_numpy(keep)
