"""Datasets: one registry, ``load_dataset(name, data_dir)``, returning uint8 tensors with class names,
image size, mean and std. Data location: ``data_dir`` argument, else the ``MAPPRUNE_DATA`` environment variable.
"""

import os
from pathlib import Path

from ..errors import MapPruneError, unknown_name
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
DATASETS = tuple(LAYOUTS)


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


def load_dataset(name: str, data_dir: str | os.PathLike | None = None) -> ImageDataset:
    """Loads a registered dataset. Raises MapPruneError naming the paths looked at when it is missing."""
    if name not in LAYOUTS:
        raise unknown_name("dataset", name, LAYOUTS)
    if name == "digits":
        return load_digits()
    root = resolve_data_dir(data_dir)
    if root is None:
        raise _missing(name, [])
    if name == "npz":
        if not root.is_file():
            raise _missing(name, [root])
        return load_npz(root, root.stem)
    if name == "imagefolder":
        if not is_image_folder(root):
            raise _missing(name, [root])
        return load_image_folder(root)
    looked = [root, root / name]
    if name in ("cifar10", "cifar100"):
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
    # gtsrb
    d = find_official(root)
    if d is not None:
        return load_official(d)
    for f in (root, root / "gtsrb32.npz", root / "gtsrb.npz", root / "gtsrb" / "gtsrb32.npz", root / "gtsrb" / "gtsrb.npz"):
        if f.is_file():
            return load_npz(f, "gtsrb", hflip=False)
    raise _missing(name, looked)


__all__ = [
    "DATASETS", "ImageDataset", "LAYOUTS", "cache_dir", "clean_subset", "from_numpy", "load_dataset",
    "resolve_data_dir", "split_holdout",
]
