"""A federated run's state after each finished round, in one safetensors file (written
atomically, so a kill leaves the previous round's file whole): the global model, FedAvgM's
buffer, the client algorithm's server and per-client state, the round number (every draw of a
round follows (seed, round, client), so it is the whole random state), the rows of per-round
metrics so far, and a fingerprint of what the run depends on: a checkpoint of another
configuration or other inputs is never resumed.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pipeline.io.checkpoints import load_tensors, save_tensors
from pipeline.train.rounds import RoundState

CHECKPOINTS = Path(".mixmerge/checkpoints/federate")  # not a DVC output: never hashed, never pushed


def checkpoint_path(run: str) -> Path:
    return CHECKPOINTS / f"{run}.safetensors"


def fingerprint(*parts: Any) -> str:
    """A stable digest of JSON-able parts (the run's configuration, the inputs' hashes)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def save_round(path: str | Path, state: RoundState, rows: list[dict], print_: str) -> None:
    tensors = {f"global.{n}": t for n, t in state.global_state.items()}
    tensors |= {f"buffer.{n}": t for n, t in state.server_buffer.items()}
    tensors |= {f"server.{n}": t for n, t in state.server_state.items()}
    tensors |= {f"client.{i}.{n}": t for i, s in state.client_states.items() for n, t in s.items()}
    save_tensors(path, tensors, {"round": state.round, "rows": rows, "fingerprint": print_})


def load_round(path: str | Path, print_: str, device="cpu") -> tuple[RoundState, list[dict]] | None:
    """The saved state and rows, or None when there is no checkpoint or it is another run's."""
    path = Path(path)
    if not path.exists():
        return None
    tensors, meta = load_tensors(path, device)
    if meta.get("fingerprint") != print_:
        return None
    parts: dict[str, dict] = {"global": {}, "buffer": {}, "server": {}}
    clients: dict[int, dict] = {}
    for key, t in tensors.items():
        kind, rest = key.split(".", 1)
        if kind == "client":
            i, name = rest.split(".", 1)
            clients.setdefault(int(i), {})[name] = t
        else:
            parts[kind][rest] = t
    return RoundState(meta["round"], parts["global"], parts["buffer"], parts["server"], clients), meta["rows"]
