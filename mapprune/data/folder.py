"""ImageFolder layout: ``root/train/<class>/*`` and ``root/test/<class>/*``; decoded arrays are cached."""

import hashlib
import os
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import MapPruneError
from ..resources import cache_dir
from .dataset import ImageDataset, from_numpy

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".ppm", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def _sort_key(p: Path):
    # CIFAR's ImageFolder copy names files by their official index: sort numerically so order is official.
    return (0, int(p.stem), "") if p.stem.isdigit() else (1, 0, p.name)


def is_image_folder(root: Path) -> bool:
    return (root / "train").is_dir() and (root / "test").is_dir()


def _list_split(root: Path, split: str, classes: list[str]):
    files, labels = [], []
    for i, c in enumerate(classes):
        d = root / split / c
        if not d.is_dir():  # a class may be absent from one split (classes come from train/)
            continue
        fs = sorted((p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), key=_sort_key)
        files += fs
        labels += [i] * len(fs)
    return files, labels


def decode_images(files: list[Path], size: tuple[int, int] | None = None, mode: str = "RGB") -> np.ndarray:
    """Decodes image files to one uint8 array (N, H, W, C); resizes when ``size`` is given."""
    def one(p):
        try:
            with Image.open(p) as im:
                im = im.convert(mode)
                if size is not None and im.size != size:
                    im = im.resize(size, Image.BILINEAR)
                a = np.asarray(im, dtype=np.uint8)
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
            raise MapPruneError(f"cannot decode image {p}: {e}") from None
        return a if a.ndim == 3 else a[:, :, None]

    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as ex:
        arrays = list(ex.map(one, files, chunksize=256))
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise MapPruneError(
            f"images in {files[0].parent.parent} have different sizes {sorted(shapes)[:3]}; "
            "resize them to one size first"
        )
    return np.stack(arrays) if arrays else np.zeros((0, 1, 1, 3), np.uint8)


def files_stamp(files: list[Path]) -> str:
    """A hash of every file's class folder, name, size and modification time: the decoded-array cache key.

    Any image replaced, added or removed anywhere in the folder changes it, so a stale cache is never used.
    """
    h = hashlib.sha256()
    for p in files:
        try:
            st = p.stat()
        except OSError as e:
            raise MapPruneError(f"cannot read image {p}: {e}") from None
        h.update(f"{p.parent.name}/{p.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _cached(key_parts: list[str], build):
    """The arrays ``build()`` returns, kept in ``cache_dir()/decoded/<hash of key_parts>.npz``.

    An entry that cannot be read back whole (truncated, not a zip file, an array missing or damaged) is rebuilt and
    replaced. Entries are written to a temporary file and renamed into place, so a reader never sees half of one.
    """
    key = hashlib.sha256("\n".join(key_parts).encode()).hexdigest()[:20]
    path = cache_dir() / "decoded" / f"{key}.npz"
    arrays = _read_npz(path) if path.is_file() else None
    if arrays is not None:
        return arrays
    arrays = build()
    tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    except OSError:  # caching is an optimisation; a read-only or full disk must not stop the run
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
    return arrays


def _read_npz(path: Path) -> dict | None:
    """Every array of a cached npz file, or None where the file is damaged or lacks the decoded images (x_train and
    x_test, which every cached entry holds)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error):
        return None
    return arrays if {"x_train", "x_test"} <= set(arrays) else None


def load_image_folder(root: Path, name: str | None = None, mode: str = "RGB", **kw) -> ImageDataset:
    root = Path(root)
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    if not classes:
        raise MapPruneError(f"{root / 'train'} holds no class folders; expected train/<class>/<image files>")
    test_classes = sorted(p.name for p in (root / "test").iterdir() if p.is_dir())
    unknown = set(test_classes) - set(classes)
    if unknown:
        raise MapPruneError(f"{root / 'test'} has classes not in train: {sorted(unknown)}")
    tr_files, tr_labels = _list_split(root, "train", classes)
    te_files, te_labels = _list_split(root, "test", classes)
    if not tr_files or not te_files:
        raise MapPruneError(f"{root}: found {len(tr_files)} train and {len(te_files)} test images; need both")
    stamp = [str(root.resolve()), mode, str(len(tr_files)), str(len(te_files)), files_stamp(tr_files),
             files_stamp(te_files)]

    def build():
        return {"x_train": decode_images(tr_files, mode=mode), "x_test": decode_images(te_files, mode=mode)}

    arrays = _cached(stamp, build)
    return from_numpy(
        name or root.name, arrays["x_train"], tr_labels, arrays["x_test"], te_labels, classes, source=str(root), **kw
    )
