"""Artifacts on disk: atomic writes, safetensors checkpoints with metadata, file hashes.

Every writer goes through ``atomic_write``: a temporary file in the target's folder, then
``os.replace``, so a stage killed at any moment leaves the previous file or none.
Checkpoints are safetensors (no pickle); their metadata holds everything needed to rebuild
the model (architecture and its arguments, normalisation, the producing config, input hashes).
"""
from __future__ import annotations

import csv
import errno
import glob
import hashlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable

import torch

from pipeline.io.errors import DataError, NonFiniteError
from safetensors import safe_open
from safetensors.torch import save as st_save

META_KEY = "mixmerge"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # read once: os.umask can only be read by setting it  # one metadata entry: a dict of several would not keep a stable order


def atomic_write(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):  # a killed earlier write's
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), _FILE_MODE)  # mkstemp makes 0600; outputs get the umask's mode, as DVC's
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write(path, (json.dumps(obj, indent=2) + "\n").encode())


def write_csv(path: str | Path, rows: Iterable[dict[str, Any]], fieldnames: list[str]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fieldnames, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, buf.getvalue().encode())


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 with RENAME_EXCHANGE); False where
    the system has no such call, so the caller falls back to two renames."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):  # kernel or filesystem without it
        return False
    raise OSError(err, os.strerror(err), str(a))


def replace_dir(target: str | Path, staged: str | Path) -> None:
    """Swap a fully written folder into place. Where the system can (Linux), the old and the new
    folder are exchanged in one atomic rename, so ``target`` exists at every instant; elsewhere
    the old one is moved aside first and a later call puts it back if a kill came between the
    two renames (see recover_dir). The old folder is deleted afterwards."""
    target, staged = Path(target), Path(staged)
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists() and _exchange(staged, target):
        shutil.rmtree(staged, ignore_errors=True)  # now holds the old folder
        return
    if target.exists():
        os.replace(target, old)
    os.replace(staged, target)
    shutil.rmtree(old, ignore_errors=True)


def recover_dir(target: str | Path) -> None:
    """After a kill: put back a folder that replace_dir's fallback moved aside and never
    replaced, and remove staging folders (``.<name>.*.tmp``) that a killed stage left."""
    target = Path(target)
    old = target.with_name(f".{target.name}.old")
    if not target.exists() and old.exists():
        os.replace(old, target)
    for leftover in target.parent.glob(f".{target.name}.*.tmp"):
        shutil.rmtree(leftover, ignore_errors=True)


def staging_dir(target: str | Path) -> Path:
    """A fresh folder beside ``target`` to write its new contents into, after clearing what a
    killed earlier run left (recover_dir). One stage writes one target at a time (DVC's lock)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(target)
    staged = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    staged.chmod(0o777 & ~_umask())  # mkdtemp makes 0700; the output folder gets the umask's mode
    return staged


def md5(path: str | Path) -> str:
    """The MD5 of a file's bytes: the hash DVC 3 records for a file in dvc.lock."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def first_non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating tensor holding NaN or +-inf, or None."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


def check_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    """Refuse a model with NaN or infinite values, naming it and its first bad tensor."""
    bad = first_non_finite(tensors)
    if bad is not None:
        raise NonFiniteError(f"{what}: tensor {bad!r} holds NaN or infinite values (training diverged? "
                             f"a smaller learning rate usually helps); refused, nothing written")


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
    """Write a checkpoint atomically; a model with NaN or infinite values is refused, so no
    stage ever saves (and so merges or registers) a diverged model."""
    check_finite(tensors, str(path))
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    atomic_write(path, st_save(tensors, metadata={META_KEY: json.dumps(metadata, sort_keys=True)}))


def _unreadable(path, e: Exception) -> DataError:
    """A truncated, corrupt or foreign file, named: safetensors' own errors do not say which."""
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    return DataError(f"{path}: not a readable mixmerge checkpoint ({type(e).__name__}: {first}); "
                     f"rerun the stage that writes it")


def load_metadata(path: str | Path) -> dict[str, Any]:
    """A checkpoint's metadata alone, without reading its tensors."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {}).get(META_KEY, "{}"))
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001  (safetensors raises its own error types)
        raise _unreadable(path, e) from None


def load_tensors(path: str | Path, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = json.loads((f.metadata() or {}).get(META_KEY, "{}"))
            return {k: f.get_tensor(k) for k in f.keys()}, meta
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001
        raise _unreadable(path, e) from None
