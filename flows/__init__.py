"""Prefect orchestration of the DVC pipeline. Runs DVC stages; never touches tensors."""
