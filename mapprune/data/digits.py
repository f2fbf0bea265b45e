"""The embedded default: scikit-learn's 1,797 handwritten 8x8 digits (real data, shipped inside scikit-learn)."""

import numpy as np

from ..errors import MapPruneError
from .dataset import ImageDataset, from_numpy


def load_digits(test_fraction: float = 0.3, seed: int = 0) -> ImageDataset:
    try:
        # lazy: scikit-learn takes about a second to import, and only the digits need it here
        from sklearn.datasets import load_digits as sk_load
    except ImportError:
        raise MapPruneError("the embedded digits need scikit-learn: pip install scikit-learn") from None
    d = sk_load()
    x = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)  # pixel values 0..16 -> 0..255
    y = d.target.astype(np.int64)
    # A fixed stratified split, so every run sees the same train/test images.
    rng = np.random.default_rng(seed)
    test = np.zeros(len(y), dtype=bool)
    for c in range(10):
        idx = np.flatnonzero(y == c)
        test[rng.permutation(idx)[: round(test_fraction * len(idx))]] = True
    return from_numpy("digits", x[~test], y[~test], x[test], y[test], [str(i) for i in range(10)],
                      source="sklearn.datasets.load_digits", hflip=False)
