"""Partitions of a training set into K shards, as federated-learning papers split clients.
PARTITIONERS maps each scheme's name to its function."""
from pipeline.methods.partition.schemes import PARTITIONERS, label_histograms, partition_hash

__all__ = ["PARTITIONERS", "label_histograms", "partition_hash"]
