"""The in-memory dataset every loader returns: uint8 image tensors plus what a model needs to know."""

import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import MapPruneError


@dataclass
class ImageDataset:
    """Train and test images as uint8 tensors (N, C, H, W) in [0, 255], labels as int64 tensors."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: list[str]
    source: str = ""
    hflip: bool = True  # False where mirroring changes the meaning (digits, traffic signs)
    mean: tuple[float, ...] = field(default=())
    std: tuple[float, ...] = field(default=())

    def __post_init__(self):
        if not self.mean or not self.std:
            x = self.x_train.float().div_(255)
            self.mean = tuple(round(v, 4) for v in x.mean(dim=(0, 2, 3)).tolist())
            self.std = tuple(round(max(v, 1e-3), 4) for v in x.std(dim=(0, 2, 3)).tolist())

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])

    def fingerprint(self) -> str:
        """A short hash of every image and label: two runs with the same fingerprint saw the same data."""
        h = hashlib.sha256()
        for t in (self.x_train, self.y_train, self.x_test, self.y_test):
            h.update(np.ascontiguousarray(t.numpy()).tobytes())
        return h.hexdigest()[:16]

    def summary(self) -> dict:
        return {
            "name": self.name,
            "source": self.source,
            "num_classes": self.num_classes,
            "image_shape": list(self.image_shape),
            "train": len(self.y_train),
            "test": len(self.y_test),
            "mean": list(self.mean),
            "std": list(self.std),
            "fingerprint": self.fingerprint(),
        }


def from_numpy(name, x_train, y_train, x_test, y_test, classes=None, **kw) -> ImageDataset:
    """Builds an ImageDataset from NHWC / NCHW / NHW uint8 arrays, checking shapes and labels."""
    def images(x, split):
        x = np.asarray(x)
        if x.ndim == 3:
            x = x[:, :, :, None]
        if x.ndim != 4:
            raise MapPruneError(f"{name}: x_{split} must have shape (N, H, W, C) or (N, C, H, W), got {x.shape}")
        if x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
            x = x.transpose(0, 3, 1, 2)
        if x.dtype != np.uint8:
            if x.size and (x.min() < 0 or x.max() > 255):
                raise MapPruneError(f"{name}: x_{split} must hold pixels in [0, 255], got [{x.min()}, {x.max()}]")
            x = np.rint(x).astype(np.uint8)
        return torch.from_numpy(np.ascontiguousarray(x))

    def labels(y, n, split):
        y = np.asarray(y).reshape(-1).astype(np.int64)
        if len(y) != n:
            raise MapPruneError(f"{name}: {n} images but {len(y)} labels in the {split} split")
        if len(y) and y.min() < 0:
            raise MapPruneError(f"{name}: negative labels in the {split} split")
        return torch.from_numpy(y)

    xtr, xte = images(x_train, "train"), images(x_test, "test")
    if xtr.shape[1:] != xte.shape[1:]:
        raise MapPruneError(f"{name}: train images are {tuple(xtr.shape[1:])} but test images {tuple(xte.shape[1:])}")
    ytr, yte = labels(y_train, len(xtr), "train"), labels(y_test, len(xte), "test")
    k = int(max(ytr.max().item() if len(ytr) else 0, yte.max().item() if len(yte) else 0)) + 1
    classes = list(classes) if classes is not None else [str(i) for i in range(k)]
    if len(classes) < k:
        raise MapPruneError(f"{name}: labels go up to {k - 1} but only {len(classes)} class names are known")
    return ImageDataset(name, xtr, ytr, xte, yte, classes, **kw)
