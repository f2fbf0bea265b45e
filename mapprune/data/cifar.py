"""CIFAR-10 / CIFAR-100 in the official python-pickle layout (what torchvision downloads).

The pickles are read with a restricted unpickler that can only rebuild plain containers and numpy arrays,
so a tampered file cannot run code.
"""

import io
import pickle
from pathlib import Path

import numpy as np

from ..errors import MapPruneError
from .dataset import ImageDataset, from_numpy

_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: CIFAR pickles hold only arrays")


def _load_batch(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            d = _SafeUnpickler(io.BytesIO(f.read()), encoding="bytes").load()
    except Exception as e:  # a damaged pickle can fail in many ways (KeyError, IndexError, struct.error, ...)
        raise MapPruneError(f"{path} is not a readable CIFAR pickle batch ({e})") from None
    if not isinstance(d, dict):
        raise MapPruneError(f"{path} is not a CIFAR pickle batch (it holds a {type(d).__name__}, not a dict)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}


def _images(batch: dict, path: Path) -> np.ndarray:
    data = np.asarray(batch.get("data"))
    if data.ndim != 2 or data.shape[1] != 3072:
        raise MapPruneError(f"{path}: expected 'data' of shape (N, 3072), got {data.shape}")
    return data.reshape(-1, 3, 32, 32).astype(np.uint8)


def find_cifar_pickle_dir(root: Path, num_classes: int) -> Path | None:
    sub = "cifar-10-batches-py" if num_classes == 10 else "cifar-100-python"
    marker = "data_batch_1" if num_classes == 10 else "train"
    for d in (root, root / sub, root / f"cifar{num_classes}" / sub, root / f"cifar{num_classes}"):
        if (d / marker).is_file() and (d / ("test_batch" if num_classes == 10 else "test")).is_file():
            return d
    return None


def load_cifar_pickles(d: Path, num_classes: int) -> ImageDataset:
    if num_classes == 10:
        train = [_load_batch(d / f"data_batch_{i}") for i in range(1, 6)]
        test = _load_batch(d / "test_batch")
        key, meta_file, names_key = "labels", "batches.meta", "label_names"
    else:
        train = [_load_batch(d / "train")]
        test = _load_batch(d / "test")
        key, meta_file, names_key = "fine_labels", "meta", "fine_label_names"
    classes = None
    if (d / meta_file).is_file():
        names = _load_batch(d / meta_file).get(names_key)
        if names:
            classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    try:
        x_train = np.concatenate([_images(b, d) for b in train])
        y_train = np.concatenate([np.asarray(b[key]) for b in train])
        x_test, y_test = _images(test, d), np.asarray(test[key])
    except KeyError as e:
        raise MapPruneError(f"{d}: CIFAR batch lacks the key {e}") from None
    name = f"cifar{num_classes}"
    if classes is None:
        classes = [str(i) for i in range(num_classes)]
    return from_numpy(name, x_train, y_train, x_test, y_test, classes, source=str(d))
