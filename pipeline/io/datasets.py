"""Dataset loaders (IO): name -> (images float32 N,C,H,W in [0, 1], labels int64, class names).

A loader returns ``(train, test)`` where ``test`` is the dataset's official test split,
or None when it has none (then prepare carves the test split out of ``train``).
Missing or unreadable data raises DataError, which stages turn into exit code 2.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from pipeline.io.errors import DataError
from pipeline.registry import Registry


@dataclass(frozen=True)
class Images:
    x: torch.Tensor  # float32, (N, C, H, W), values in [0, 1]
    y: torch.Tensor  # int64, (N,)


@dataclass(frozen=True)
class RawDataset:
    train: Images
    test: Images | None
    classes: list[str]


DATASETS: Registry[Callable[..., RawDataset]] = Registry("dataset")


@DATASETS.register("digits")
def digits(root: str | None = None, download: bool = False, image_size: int | None = None) -> RawDataset:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes; no download)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)
    return RawDataset(Images(x, torch.from_numpy(d.target.astype(np.int64))), None, [str(c) for c in range(10)])


def _require_root(root: str | None, name: str) -> Path:
    if not root:
        raise DataError(f"prepare.root is not set: dataset {name!r} needs a local folder (or download: true)")
    return Path(root)


def _to_images(data, targets, channels_last: bool) -> Images:
    x = torch.as_tensor(np.asarray(data))
    if x.ndim == 3:
        x = x.unsqueeze(1)
    elif channels_last:
        x = x.permute(0, 3, 1, 2)
    return Images(x.contiguous().float() / 255.0, torch.as_tensor(np.asarray(targets), dtype=torch.int64))


def _torchvision(cls_name: str, split_kw: str, channels_last: bool, target_attr: str = "targets"):
    def load(root: str | None = None, download: bool = False, image_size: int | None = None) -> RawDataset:
        import torchvision.datasets as tvd  # heavy import: only the stages that need it pay

        path = _require_root(root, cls_name)
        cls = getattr(tvd, cls_name)
        try:
            if split_kw == "train":
                tr, te = cls(path, train=True, download=download), cls(path, train=False, download=download)
            else:
                tr, te = cls(path, split="train", download=download), cls(path, split="test", download=download)
        except (RuntimeError, OSError) as e:
            raise DataError(f"prepare.root = {str(path)!r}: cannot read {cls_name} ({e})") from None
        classes = [str(c) for c in getattr(tr, "classes", range(int(np.max(getattr(tr, target_attr))) + 1))]
        return RawDataset(
            _to_images(tr.data, getattr(tr, target_attr), channels_last),
            _to_images(te.data, getattr(te, target_attr), channels_last),
            classes,
        )

    load.__doc__ = f"torchvision's {cls_name} from a local root (downloads only if download: true)."
    return load


DATASETS.register("mnist")(_torchvision("MNIST", "train", False))
DATASETS.register("fashion_mnist")(_torchvision("FashionMNIST", "train", False))
DATASETS.register("cifar10")(_torchvision("CIFAR10", "train", True))
DATASETS.register("cifar100")(_torchvision("CIFAR100", "train", True))
DATASETS.register("svhn")(_torchvision("SVHN", "split", False, target_attr="labels"))


@DATASETS.register("imagefolder")
def imagefolder(root: str | None = None, download: bool = False, image_size: int | None = None) -> RawDataset:
    """Any ``root/<class>/<image>`` folder (torchvision's ImageFolder); all images one size."""
    import torchvision.datasets as tvd
    from torchvision.transforms import v2

    path = _require_root(root, "imagefolder")
    steps = [v2.PILToTensor()] + ([v2.Resize((image_size, image_size))] if image_size else [])
    try:
        ds = tvd.ImageFolder(str(path), transform=v2.Compose(steps))
        pairs = [ds[i] for i in range(len(ds))]
    except (FileNotFoundError, OSError) as e:
        raise DataError(f"prepare.root = {str(path)!r}: cannot read an ImageFolder ({e})") from None
    shapes = {tuple(img.shape) for img, _ in pairs}
    if len(shapes) != 1:
        raise DataError(f"prepare.root = {str(path)!r}: images differ in shape {sorted(shapes)[:3]}; set prepare.image_size")
    x = torch.stack([img for img, _ in pairs]).float() / 255.0
    y = torch.tensor([label for _, label in pairs], dtype=torch.int64)
    return RawDataset(Images(x, y), None, list(ds.classes))
