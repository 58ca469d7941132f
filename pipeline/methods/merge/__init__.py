"""Mergers: K models in, one model out, no training. The registry MERGERS is filled by
importing the modules below, one per kind of merger; sparsifiers sit apart in sparsify.py."""
from pipeline.methods.merge import averaging, data_aware, task_vectors  # noqa: F401  (registers the mergers)
from pipeline.methods.merge.base import MERGERS, StateDict

__all__ = ["MERGERS", "StateDict"]
