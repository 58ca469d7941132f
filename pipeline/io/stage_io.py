"""Reading other stages' artifacts back, shared by the stages that consume them."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.io import layout
from pipeline.io.checkpoints import load_tensors
from pipeline.train.data_path import BatchSource
from pipeline.nn.models import build


def free_memory(device: torch.device) -> int:
    """Free bytes on ``device``: the CUDA allocator's view, or the host's available RAM."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def choose_data_path(path: str, dataset_file: str | Path, device: torch.device) -> str:
    """``resident`` or ``host`` for the configured ``path`` (auto decides by size)."""
    if path != "auto":
        return path
    return "resident" if Path(dataset_file).stat().st_size <= free_memory(device) // 2 else "host"


@dataclass(frozen=True)
class Prepared:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    meta: dict[str, Any]
    path: str  # "resident": images on the device; "host": memory-mapped in host memory

    @property
    def num_classes(self) -> int:
        return self.meta["num_classes"]


def load_prepared(device: torch.device, path: str = "resident") -> Prepared:
    """The prepared splits; labels on ``device``, images there too unless ``path`` (see
    pipeline.train.data_path) leaves them memory-mapped in host memory."""
    path = choose_data_path(path, layout.DATASET, device)
    tensors, meta = load_tensors(layout.DATASET, "cpu")  # memory-mapped by safetensors
    on = {k: v.to(device) if k.startswith("y_") or path == "resident" else v for k, v in tensors.items()}
    return Prepared(**on, meta=meta, path=path)


def source(data: Prepared, x: torch.Tensor, y: torch.Tensor, device: torch.device, workers: int) -> BatchSource:
    """A training set served the way ``data`` was loaded."""
    return BatchSource(x, y, device, data.path, workers)


def load_manifest() -> dict[str, Any]:
    return json.loads(layout.MANIFEST.read_text())


def shard_tensors(data: Prepared, manifest: dict[str, Any], shard: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The training images and labels of one shard, as the manifest lists them."""
    index = torch.tensor(manifest["shards"][shard]["indices"], dtype=torch.long)
    return data.x_train[index.to(data.x_train.device)], data.y_train[index.to(data.y_train.device)]


def split_digest(dataset_md5: str, split: str, indices: list[int] | None = None) -> str:
    """A digest of one split of the prepared dataset (or of one shard: its indices) for
    MLflow's dataset inputs, so each shard and split shows as a dataset of its own."""
    h = hashlib.sha256(f"{dataset_md5}:{split}".encode())
    if indices is not None:
        h.update(json.dumps(indices).encode())
    return h.hexdigest()


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
