"""Federated and decentralised learning's methods: client algorithms (what a client adds to
its local training and keeps between rounds) and topologies (decentralised gossip graphs)."""
from pipeline.methods.federated.clients import CLIENT_ALGORITHMS, ClientAlgorithm, LocalTerms
from pipeline.methods.federated.topology import TOPOLOGIES

__all__ = ["CLIENT_ALGORITHMS", "ClientAlgorithm", "LocalTerms", "TOPOLOGIES"]
