"""Datasets: one registry, ``load_dataset(name, data_dir)``, returning uint8 tensors with class names,
image size, mean and std. Data location: ``data_dir`` argument, else the ``MAPPRUNE_DATA`` environment variable.
"""

import os
from functools import partial
from pathlib import Path

from ..errors import MapPruneError
from ..registry import Registry
from .cifar import find_cifar_pickle_dir, load_cifar_pickles
from .dataset import ImageDataset, from_numpy
from .digits import load_digits
from .folder import cache_dir, is_image_folder, load_image_folder
from .gtsrb import find_official, load_npz, load_official
from .subset import clean_subset, split_holdout

LAYOUTS = {
    "cifar10": "the python-pickle layout (cifar-10-batches-py/data_batch_1..5, test_batch) or an ImageFolder "
    "(train/<class>/*, test/<class>/*), in DATA or DATA/cifar10",
    "cifar100": "the python-pickle layout (cifar-100-python/train, test, meta) or an ImageFolder, in DATA or DATA/cifar100",
    "gtsrb": "the official layout (Final_Training/Images/<class>/*.ppm + GT-<class>.csv, Final_Test/Images + "
    "GT-final_test.csv) or an npz with x_train/y_train/x_test/y_test (DATA/gtsrb/gtsrb32.npz), in DATA or DATA/gtsrb",
    "imagefolder": "an ImageFolder: DATA/train/<class>/* and DATA/test/<class>/*",
    "npz": "an .npz file with x_train, y_train, x_test, y_test (DATA is the file)",
    "digits": "nothing: scikit-learn's embedded 8x8 digits",
}


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path | None:
    if data_dir is not None:
        return Path(data_dir).expanduser()
    env = os.environ.get("MAPPRUNE_DATA")
    return Path(env).expanduser() if env else None


def _missing(name: str, looked: list[Path]) -> MapPruneError:
    where = ", ".join(str(p) for p in looked) if looked else "(no data folder given)"
    return MapPruneError(
        f"no {name} dataset found (looked in {where}); expected {LAYOUTS[name]}. "
        "Point --data-dir or MAPPRUNE_DATA at the folder."
    )


def _load_digits(root: Path | None) -> ImageDataset:
    return load_digits()


def _load_npz(root: Path | None) -> ImageDataset:
    if root is None or not root.is_file():
        raise _missing("npz", [root] if root is not None else [])
    return load_npz(root, root.stem)


def _load_imagefolder(root: Path | None) -> ImageDataset:
    if root is None or not is_image_folder(root):
        raise _missing("imagefolder", [root] if root is not None else [])
    return load_image_folder(root)


def _load_cifar(name: str, root: Path | None) -> ImageDataset:
    if root is None:
        raise _missing(name, [])
    looked = [root, root / name]
    k = 10 if name == "cifar10" else 100
    d = find_cifar_pickle_dir(root, k)
    if d is not None:
        return load_cifar_pickles(d, k)
    for cand in looked:
        if is_image_folder(cand):
            ds = load_image_folder(cand, name)
            if ds.num_classes != k:
                raise MapPruneError(f"{cand} has {ds.num_classes} class folders but {name} has {k}")
            return ds
    raise _missing(name, looked)


def _load_gtsrb(root: Path | None) -> ImageDataset:
    if root is None:
        raise _missing("gtsrb", [])
    d = find_official(root)
    if d is not None:
        return load_official(d)
    for f in (root, root / "gtsrb32.npz", root / "gtsrb.npz", root / "gtsrb" / "gtsrb32.npz", root / "gtsrb" / "gtsrb.npz"):
        if f.is_file():
            return load_npz(f, "gtsrb", hflip=False)
    raise _missing("gtsrb", [root, root / "gtsrb"])


# name -> loader(data folder: Path | None) returning an ImageDataset. A dataset of one's own joins with
# ``DATASETS.register(name, loader)`` or the ``mapprune.datasets`` entry-point group.
DATASETS = Registry("dataset", "mapprune.datasets", decorator="DATASETS.register")
for _name, _loader in {"cifar10": partial(_load_cifar, "cifar10"), "cifar100": partial(_load_cifar, "cifar100"),
                       "gtsrb": _load_gtsrb, "imagefolder": _load_imagefolder, "npz": _load_npz,
                       "digits": _load_digits}.items():
    DATASETS.register(_name, _loader)
del _name, _loader


def load_dataset(name: str, data_dir: str | os.PathLike | None = None) -> ImageDataset:
    """Loads a registered dataset from ``data_dir`` (else ``MAPPRUNE_DATA``). Raises MapPruneError naming the paths
    looked at when it is missing."""
    return DATASETS.get(name)(resolve_data_dir(data_dir))


__all__ = [
    "DATASETS", "ImageDataset", "LAYOUTS", "cache_dir", "clean_subset", "from_numpy", "load_dataset",
    "resolve_data_dir", "split_holdout",
]
