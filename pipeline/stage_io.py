"""Reading other stages' artifacts back, shared by the stages that consume them."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch

from pipeline import layout
from pipeline.checkpoints import load_tensors
from pipeline.models import build


@dataclass(frozen=True)
class Prepared:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    meta: dict[str, Any]

    @property
    def num_classes(self) -> int:
        return self.meta["num_classes"]


def load_prepared(device: torch.device) -> Prepared:
    tensors, meta = load_tensors(layout.DATASET, device)
    return Prepared(**tensors, meta=meta)


def load_manifest() -> dict[str, Any]:
    return json.loads(layout.MANIFEST.read_text())


def shard_tensors(data: Prepared, manifest: dict[str, Any], shard: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The training images and labels of one shard, as the manifest lists them."""
    index = torch.tensor(manifest["shards"][shard]["indices"], dtype=torch.long, device=data.x_train.device)
    return data.x_train[index], data.y_train[index]


def load_model(path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild a model from a checkpoint's own metadata and load its weights."""
    state, meta = load_tensors(path, device)
    arch = meta["architecture"]
    model = build(arch["name"], arch["in_channels"], arch["num_classes"], arch["width"]).to(device)
    model.load_state_dict(state)
    return model, meta


def inherited_metadata(meta: dict[str, Any]) -> dict[str, Any]:
    """The entries every checkpoint carries over from the backbone it descends from."""
    return {k: meta[k] for k in ("architecture", "normalization", "image_shape", "classes")}


def architecture(arch: str, prepared: Prepared, width: int) -> dict[str, Any]:
    """The checkpoint metadata entry that rebuilds the model (see checkpoints.load_model)."""
    return {
        "name": arch,
        "in_channels": prepared.meta["image_shape"][0],
        "num_classes": prepared.num_classes,
        "width": width,
    }
