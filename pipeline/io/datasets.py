"""Dataset loaders (IO): name -> (images float32 N,C,H,W in [0, 1], labels int64, class names).

A loader returns ``(train, test)`` where ``test`` is the dataset's official test split,
or None when it has none (then prepare carves the test split out of ``train``).
Missing or unreadable data raises DataError, which stages turn into exit code 2.
"""
from __future__ import annotations

import pickle
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


def _to_images(data, targets) -> Images:
    """Greyscale uint8 images (N, H, W) and their labels as an Images."""
    x = torch.as_tensor(np.asarray(data)).unsqueeze(1)
    return Images(x.contiguous().float() / 255.0, torch.as_tensor(np.asarray(targets), dtype=torch.int64))


def _fetch(cls_name: str, path: Path, **split) -> None:
    """torchvision downloads (and checks) the official files into ``path``; we read them."""
    import torchvision.datasets as tvd  # heavy import: only a download pays for it

    try:
        getattr(tvd, cls_name)(str(path), download=True, **split)
    except (RuntimeError, OSError) as e:
        raise DataError(f"prepare.root = {str(path)!r}: cannot download {cls_name} ({e})") from None


def _mnist_like(cls_name: str):
    def load(root: str | None = None, download: bool = False, image_size: int | None = None) -> RawDataset:
        import torchvision.datasets as tvd  # reads the IDX files of root/<cls_name>/raw

        path = _require_root(root, cls_name)
        cls = getattr(tvd, cls_name)
        try:
            tr, te = cls(str(path), train=True, download=download), cls(str(path), train=False, download=download)
        except (RuntimeError, OSError, ValueError) as e:
            raise DataError(f"prepare.root = {str(path)!r}: cannot read {cls_name} ({e})") from None
        return RawDataset(_to_images(tr.data, tr.targets), _to_images(te.data, te.targets),
                          [str(c) for c in tr.classes])

    load.__doc__ = f"{cls_name} from its IDX files under root/{cls_name}/raw (torchvision's layout)."
    return load


DATASETS.register("mnist")(_mnist_like("MNIST"))
DATASETS.register("fashion_mnist")(_mnist_like("FashionMNIST"))


class _ArraysOnly(pickle.Unpickler):
    """CIFAR's python batches are pickles. Unpickling runs whatever a file names, so only the
    few callables that rebuild numpy arrays (and Python 2's bytes) are let through; anything
    else is refused (the pattern of the Python docs' "Restricting Globals")."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing {module}.{name}: a CIFAR batch holds only arrays and lists")
        return super().find_class(module, name)


def _read_batch(path: Path) -> dict:
    with path.open("rb") as f:
        return _ArraysOnly(f, encoding="latin1").load()


def _cifar(cls_name: str, folder: str, train_files: list[str], label_key: str, meta: tuple[str, str]):
    def load(root: str | None = None, download: bool = False, image_size: int | None = None) -> RawDataset:
        path = _require_root(root, cls_name)
        if download and not (path / folder).is_dir():
            _fetch(cls_name, path)
        try:
            def images(names: list[str]) -> Images:
                batches = [_read_batch(path / folder / n) for n in names]
                x = np.concatenate([np.asarray(b["data"], dtype=np.uint8) for b in batches]).reshape(-1, 3, 32, 32)
                y = np.concatenate([np.asarray(b[label_key], dtype=np.int64) for b in batches])
                return Images(torch.from_numpy(x).float() / 255.0, torch.from_numpy(y))

            train, test = images(train_files), images(["test_batch" if cls_name == "CIFAR10" else "test"])
            classes = [str(c) for c in _read_batch(path / folder / meta[0])[meta[1]]]
        except (OSError, KeyError, ValueError, EOFError, pickle.UnpicklingError) as e:
            raise DataError(f"prepare.root = {str(path)!r}: cannot read {cls_name} from {folder}/ ({e})") from None
        return RawDataset(train, test, classes)

    load.__doc__ = (f"{cls_name} from its python batches under root/{folder}/ (the official archive's "
                    f"layout, as torchvision downloads it); arrays only are unpickled.")
    return load


DATASETS.register("cifar10")(_cifar("CIFAR10", "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)],
                                    "labels", ("batches.meta", "label_names")))
DATASETS.register("cifar100")(_cifar("CIFAR100", "cifar-100-python", ["train"], "fine_labels",
                                     ("meta", "fine_label_names")))


@DATASETS.register("svhn")
def svhn(root: str | None = None, download: bool = False, image_size: int | None = None) -> RawDataset:
    """SVHN's cropped digits from root/train_32x32.mat and root/test_32x32.mat (MATLAB files:
    X is (32, 32, 3, N), y is (N, 1) with label 10 for the digit 0)."""
    from scipy.io import loadmat

    path = _require_root(root, "SVHN")

    def images(split: str) -> Images:
        if download and not (path / f"{split}_32x32.mat").is_file():
            _fetch("SVHN", path, split=split)
        mat = loadmat(str(path / f"{split}_32x32.mat"))
        x = torch.from_numpy(np.ascontiguousarray(mat["X"].transpose(3, 2, 0, 1))).float() / 255.0
        y = torch.from_numpy(mat["y"].astype(np.int64).reshape(-1) % 10)
        return Images(x, y)

    try:
        return RawDataset(images("train"), images("test"), [str(c) for c in range(10)])
    except (OSError, KeyError, ValueError) as e:
        raise DataError(f"prepare.root = {str(path)!r}: cannot read SVHN ({e})") from None


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
