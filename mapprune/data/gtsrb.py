"""GTSRB from the official folder layout (resized to 32x32, whole frame, as BackdoorBench does) or from an npz."""

import csv
import zipfile
import zlib
from pathlib import Path

import numpy as np

from ..errors import MapPruneError
from .dataset import ImageDataset, from_numpy
from .folder import _cached, decode_images, files_stamp

NUM_CLASSES = 43
SIZE = (32, 32)


def find_official(root: Path) -> Path | None:
    for d in (root, root / "GTSRB", root / "gtsrb", root / "gtsrb" / "GTSRB"):
        if (d / "Final_Training" / "Images").is_dir():
            return d
    return None


def _test_csv(d: Path) -> Path | None:
    for p in (d / "GT-final_test.csv", d / "Final_Test" / "GT-final_test.csv", d / "Final_Test" / "Images" / "GT-final_test.csv"):
        if p.is_file():
            return p
    return None


def _read_gt(path: Path) -> list[tuple[str, int]]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f, delimiter=";"))
    if not rows or "Filename" not in rows[0] or "ClassId" not in rows[0]:
        raise MapPruneError(f"{path} is not a GTSRB ground-truth csv (needs Filename;...;ClassId columns)")
    try:
        return [(r["Filename"], int(r["ClassId"])) for r in rows]
    except (TypeError, ValueError) as e:
        raise MapPruneError(f"{path}: a row has no valid ClassId ({e})") from None


def load_official(d: Path) -> ImageDataset:
    tr_files, tr_labels = [], []
    for cdir in sorted((d / "Final_Training" / "Images").iterdir()):
        if not cdir.is_dir():
            continue
        gts = sorted(cdir.glob("GT-*.csv"))
        if not gts:
            raise MapPruneError(f"{cdir} has no GT-<class>.csv; expected the official GTSRB training layout")
        for fname, cid in _read_gt(gts[0]):
            tr_files.append(cdir / fname)
            tr_labels.append(cid)
    test_csv = _test_csv(d)
    if test_csv is None:
        raise MapPruneError(f"{d}: no GT-final_test.csv (looked in {d} and {d / 'Final_Test'})")
    te_files, te_labels = [], []
    for fname, cid in _read_gt(test_csv):
        te_files.append(d / "Final_Test" / "Images" / fname)
        te_labels.append(cid)
    stamp = [str(d.resolve()), "gtsrb", str(len(tr_files)), str(len(te_files)), files_stamp(tr_files),
             files_stamp(te_files)]
    arrays = _cached(stamp, lambda: {"x_train": decode_images(tr_files, SIZE), "x_test": decode_images(te_files, SIZE)})
    return from_numpy("gtsrb", arrays["x_train"], tr_labels, arrays["x_test"], te_labels,
                      [str(i) for i in range(NUM_CLASSES)], source=str(d), hflip=False)


def load_npz(path: Path, name: str, **kw) -> ImageDataset:
    """Any npz with x_train, y_train, x_test, y_test (images NHWC, NCHW or NHW uint8)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = {"x_train", "y_train", "x_test", "y_test"} - set(z.files)
            if missing:
                raise MapPruneError(f"{path} lacks arrays {sorted(missing)}; an npz dataset needs x_train, y_train, x_test, y_test")
            arrays = {k: z[k] for k in ("x_train", "y_train", "x_test", "y_test")}
            classes = [str(c) for c in z["classes"]] if "classes" in z.files else None
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as e:
        raise MapPruneError(f"{path} is not a readable npz file ({e}); re-create it or restore it from a copy") from None
    return from_numpy(name, **arrays, classes=classes, source=str(path), **kw)
