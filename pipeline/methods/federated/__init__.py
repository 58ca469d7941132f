"""Federated client algorithms: what a client adds to its local objective in a round.
CLIENT_ALGORITHMS maps each name to its builder (pipeline.methods.federated.clients)."""
from pipeline.methods.federated.clients import CLIENT_ALGORITHMS

__all__ = ["CLIENT_ALGORITHMS"]
