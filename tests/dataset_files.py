"""Tiny copies of each dataset in its real on-disk format, written the way the official
archives lay them out: MNIST's IDX files, CIFAR's python batches (pickled with protocol 2, as
the Python 2 originals), SVHN's MATLAB files, an ImageFolder of PNGs. The images carry a
class-dependent pattern plus noise, so a model can learn something from them."""
from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def images(n: int, shape: tuple[int, ...], classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (n, *shape) whose brightness pattern depends on the label, and the labels.
    The class patterns depend on the shape and class count only, so train and test splits
    (different ``seed``) share them."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    rng.shuffle(y)
    base = np.random.default_rng(classes).integers(0, 256, (classes, *shape))
    x = np.clip(0.7 * base[y] + rng.normal(0, 30, (n, *shape)), 0, 255).astype(np.uint8)
    return x, y


def write_idx(path: Path, array: np.ndarray) -> None:
    """LeCun's IDX format: magic (0, 0, type 0x08 = ubyte, ndim), big-endian dims, then data."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_mnist(root: Path, folder: str = "MNIST", n_train: int = 120, n_test: int = 40) -> Path:
    raw = root / folder / "raw"
    for prefix, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        x, y = images(n, (28, 28), 10, seed)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", x)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", y)
    return root


def _pickle(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_cifar10(root: Path, per_batch: int = 24, n_test: int = 40) -> Path:
    folder = root / "cifar-10-batches-py"
    for i in range(1, 6):
        x, y = images(per_batch, (3, 32, 32), 10, i)
        _pickle(folder / f"data_batch_{i}", {"batch_label": f"training batch {i} of 5",
                                             "labels": y.tolist(), "data": x.reshape(per_batch, -1)})
    x, y = images(n_test, (3, 32, 32), 10, 9)
    _pickle(folder / "test_batch", {"batch_label": "testing batch 1 of 1", "labels": y.tolist(),
                                    "data": x.reshape(n_test, -1)})
    _pickle(folder / "batches.meta", {"label_names": CIFAR10_NAMES, "num_cases_per_batch": per_batch})
    return root


def write_cifar100(root: Path, n_train: int = 500, n_test: int = 100) -> Path:
    folder = root / "cifar-100-python"
    for name, n, seed in (("train", n_train, 0), ("test", n_test, 1)):
        x, y = images(n, (3, 32, 32), 100, seed)
        _pickle(folder / name, {"filenames": [f"{i}.png" for i in range(n)], "fine_labels": y.tolist(),
                                "coarse_labels": (y // 5).tolist(), "data": x.reshape(n, -1)})
    _pickle(folder / "meta", {"fine_label_names": [f"class{i}" for i in range(100)],
                              "coarse_label_names": [f"super{i}" for i in range(20)]})
    return root


def write_svhn(root: Path, n_train: int = 120, n_test: int = 40) -> Path:
    from scipy.io import savemat

    root.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", n_train, 0), ("test", n_test, 1)):
        x, y = images(n, (32, 32, 3), 10, seed)
        labels = np.where(y == 0, 10, y).reshape(-1, 1).astype(np.uint8)  # SVHN labels the digit 0 as 10
        savemat(str(root / f"{split}_32x32.mat"), {"X": x.transpose(1, 2, 3, 0), "y": labels})
    return root


def write_imagefolder(root: Path, per_class: int = 30, classes: int = 4) -> Path:
    from PIL import Image

    x, y = images(per_class * classes, (16, 16, 3), classes, 0)
    for i, (img, label) in enumerate(zip(x, y)):
        (root / f"class_{label}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / f"class_{label}" / f"{i}.png")
    return root


WRITERS = {
    "mnist": write_mnist,
    "fashion_mnist": lambda root: write_mnist(root, "FashionMNIST"),
    "cifar10": write_cifar10,
    "cifar100": write_cifar100,
    "svhn": write_svhn,
    "imagefolder": write_imagefolder,
}
