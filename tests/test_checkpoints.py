import os

import pytest
import torch

from pipeline.io import checkpoints
from pipeline.nn.models import SmallCNN
from pipeline.io.stage_io import load_model


def test_save_load_roundtrip_rebuilds_the_model(tmp_path):
    model = SmallCNN(1, 10, 4)
    meta = {"architecture": {"name": "small_cnn", "in_channels": 1, "num_classes": 10, "width": 4}, "x": [1, 2]}
    path = tmp_path / "m.safetensors"
    checkpoints.save_tensors(path, model.state_dict(), meta)
    loaded, got_meta = load_model(path)
    assert got_meta == meta
    x = torch.randn(2, 1, 8, 8)
    model.eval(), loaded.eval()
    assert torch.equal(model(x), loaded(x))


def test_checkpoint_bytes_are_deterministic(tmp_path):
    torch.manual_seed(0)
    sd = SmallCNN(1, 10, 4).state_dict()
    meta = {"b": 1, "a": {"z": 2, "y": 3}}
    checkpoints.save_tensors(tmp_path / "a", sd, meta)
    checkpoints.save_tensors(tmp_path / "b", sd, dict(reversed(meta.items())))
    assert checkpoints.md5(tmp_path / "a") == checkpoints.md5(tmp_path / "b")


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "out.bin"
    checkpoints.atomic_write(path, b"old")

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        checkpoints.atomic_write(path, b"new")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"], "no temporary file left behind"


def test_md5_is_the_hash_dvc_records(tmp_path):
    import hashlib

    (tmp_path / "f").write_bytes(b"hello")
    assert checkpoints.md5(tmp_path / "f") == hashlib.md5(b"hello").hexdigest()


def test_replace_dir_swaps_whole_folders(tmp_path):
    target = tmp_path / "merged"
    target.mkdir()
    (target / "stale.safetensors").write_bytes(b"x")
    staged = checkpoints.staging_dir(target)
    (staged / "new.safetensors").write_bytes(b"y")
    checkpoints.replace_dir(target, staged)
    assert [p.name for p in target.iterdir()] == ["new.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_metadata_reads_without_the_tensors(tmp_path):
    path = tmp_path / "m.safetensors"
    checkpoints.save_tensors(path, {"w": torch.ones(3)}, {"architecture": {"name": "small_cnn"}, "k": [1, 2]})
    assert checkpoints.load_metadata(path) == checkpoints.load_tensors(path)[1] == {
        "architecture": {"name": "small_cnn"}, "k": [1, 2]}
