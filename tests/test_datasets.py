import json
import os
import pickle

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from sklearn.datasets import load_digits

from pipeline.io.datasets import DATASETS, DataError
from pipeline.prepare import split
from tests.conftest import REPO, forget_mlflow_tracking_uri, set_key
from tests.dataset_files import WRITERS, write_cifar10, write_mnist, write_svhn


def test_digits_is_real_and_in_range():
    ds = DATASETS["digits"]()
    assert ds.train.x.shape == (1797, 1, 8, 8) and ds.test is None
    assert 0 <= ds.train.x.min() and ds.train.x.max() <= 1
    assert torch.bincount(ds.train.y).tolist() == np.bincount(load_digits().target).tolist()


def test_imagefolder_of_generated_pngs(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    ds = DATASETS["imagefolder"](root=str(tmp_path))
    assert ds.train.x.shape == (6, 3, 12, 12) and ds.classes == ["cat", "dog"]
    assert ds.train.y.tolist() == [0, 0, 0, 1, 1, 1]
    resized = DATASETS["imagefolder"](root=str(tmp_path), image_size=8)
    assert resized.train.x.shape == (6, 3, 8, 8)


def test_imagefolder_with_mixed_sizes_names_the_fix(tmp_path):
    (tmp_path / "a").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "a" / "0.png")
    Image.new("RGB", (9, 9)).save(tmp_path / "a" / "1.png")
    with pytest.raises(DataError, match="set prepare.image_size"):
        DATASETS["imagefolder"](root=str(tmp_path))


def test_split_is_stratified_disjoint_and_seeded():
    ds = DATASETS["digits"]()
    tr, va, te = split(ds.train, None, 0.15, 0.2, seed=0)
    assert len(tr.y) + len(va.y) + len(te.y) == 1797
    for part in (tr, va, te):  # class proportions within 3 points of the whole
        frac = torch.bincount(part.y, minlength=10).float() / len(part.y)
        assert (frac - 0.1).abs().max() < 0.03
    tr2, _, _ = split(ds.train, None, 0.15, 0.2, seed=0)
    assert torch.equal(tr.x, tr2.x)


# -- every dataset prepare accepts, from a tiny copy in its real on-disk format ---------------

@pytest.mark.parametrize("name", sorted(WRITERS))
def test_loader_reads_the_real_format(name, tmp_path):
    WRITERS[name](tmp_path)
    ds = DATASETS[name](root=str(tmp_path))
    assert ds.train.x.dtype == torch.float32 and 0 <= ds.train.x.min() and ds.train.x.max() <= 1
    assert ds.train.x.shape[1:] in {(1, 28, 28), (3, 32, 32), (3, 16, 16)}
    assert len(ds.classes) == int(ds.train.y.max()) + 1 or name == "imagefolder"
    if ds.test is not None:  # an official test split is kept apart
        assert ds.test.x.shape[1:] == ds.train.x.shape[1:]


def test_mnist_labels_and_pixels_come_through_unchanged(tmp_path):
    from tests.dataset_files import images

    write_mnist(tmp_path)
    ds = DATASETS["mnist"](root=str(tmp_path))
    x, y = images(120, (28, 28), 10, 0)
    assert ds.train.y.tolist() == y.tolist()
    assert torch.equal((ds.train.x[:, 0] * 255).round().to(torch.uint8), torch.from_numpy(x))


def test_svhn_label_10_is_the_digit_0(tmp_path):
    write_svhn(tmp_path)
    assert DATASETS["svhn"](root=str(tmp_path)).train.y.min() == 0


def test_a_cifar_batch_that_names_other_code_is_refused(tmp_path):
    write_cifar10(tmp_path)

    class Payload:
        def __reduce__(self):
            return (os.system, ("touch pwned",))

    with open(tmp_path / "cifar-10-batches-py" / "data_batch_3", "wb") as f:
        pickle.dump({"data": Payload(), "labels": []}, f, protocol=2)
    with pytest.raises(DataError, match="refusing posix.system"):
        DATASETS["cifar10"](root=str(tmp_path))
    assert not (tmp_path / "pwned").exists()


TINY_RUN = {
    "base.shards": [0, 1], "prepare.val_fraction": 0.2, "prepare.partition.method": "iid",
    "pretrain.epochs": 1, "pretrain.width": 4, "pretrain.batch_size": 32, "mix_train.epochs": 1,
    "merge.mergers": {"fedavg": {"method": "fedavg"}}, "merge.registered_model": None,
    "evaluate.interpolation_points": 2,
}


@pytest.fixture(scope="module")
def tracking(tmp_path_factory):
    """One MLflow store for every dataset's run (creating a SQLite store costs seconds)."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.delenv("MIXMERGE_PARENT_RUN_ID", raising=False)
        yield uri
        forget_mlflow_tracking_uri()


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_the_pipeline_runs_on_the_real_format(name, tmp_path, tracking, monkeypatch):
    """prepare, pretrain, mix_train, merge and evaluate, in this process, on a tiny copy."""
    from pipeline import evaluate, merge, mix_train, prepare, pretrain

    root = WRITERS[name](tmp_path / "raw")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for key, value in {**TINY_RUN, "prepare.dataset": name, "prepare.root": str(root)}.items():
        set_key(params, key, value)
    project = tmp_path / "project"
    project.mkdir()
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(project)
    for stage, argv in ((prepare, []), (pretrain, []), (mix_train, ["--shard", "0", "1"]), (merge, []),
                        (evaluate, [])):
        stage.main(argv)
    metrics = json.loads((project / "results" / "metrics.json").read_text())
    assert set(metrics["test"]) == {"pretrained", "expert_0", "expert_1", "fedavg", "ensemble"}
    manifest = json.loads((project / "data" / "prepared" / "partition.json").read_text())
    raw = DATASETS[name](root=str(root))
    assert manifest["dataset"] == name
    assert sum(len(s["indices"]) for s in manifest["shards"]) == split_size(project, "y_train")
    if raw.test is not None:  # the official test split is the one evaluated
        assert len(raw.test.y) == split_size(project)
    for model in metrics["test"].values():
        assert 0 <= model["accuracy"] <= 1


def split_size(project, split="y_test"):
    from safetensors import safe_open

    with safe_open(str(project / "data" / "prepared" / "dataset.safetensors"), "pt") as f:
        return f.get_slice(split).get_shape()[0]
