import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from pipeline.io.datasets import DATASETS, DataError
from pipeline.prepare import split


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
