"""The pretrain stage as a process, for what the default experiment does not run."""
import json
import sys

import pytest
import yaml

from pipeline.io.checkpoints import load_tensors
from tests.conftest import default_params, run, set_key


@pytest.mark.parametrize("method,arch", [("simclr", "small_cnn"), ("supervised", "resnet18_cifar"),
                                         ("supcon", "small_cnn"), ("selfcon", "small_cnn"), ("mixco", "small_cnn"),
                                         ("barlow_twins", "small_cnn"), ("mixed_barlow_twins", "small_cnn")])
def test_pretrain_stage(tmp_path, method, arch):
    params = default_params()
    for key, value in {"pretrain.method": method, "pretrain.arch": arch, "pretrain.epochs": 3,
                       "pretrain.width": 8, "pretrain.probe_epochs": 10, "base.shards": [0, 1]}.items():
        set_key(params, key, value)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    for stage in ("prepare", "pretrain"):
        proc = run([sys.executable, "-m", f"pipeline.{stage}"], tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
    state, meta = load_tensors(tmp_path / "data/pretrain/model.safetensors")
    assert meta["architecture"]["name"] == arch and meta["config"]["pretrain"]["method"] == method
    metrics = json.loads((tmp_path / "data/pretrain/metrics.json").read_text())
    # SimCLR is judged through its linear probe; 3 epochs are enough to beat chance (0.1) by far
    assert metrics["val_accuracy"] > 0.3, metrics
    assert ("(linear probe)" in proc.stdout) == (method != "supervised")
    assert 0.3 < metrics["val_probe_accuracy"] <= 1 and 0.3 < metrics["val_knn_accuracy"] <= 1
