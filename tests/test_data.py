"""Dataset loaders on small files written in each supported layout, plus the real datasets when present."""

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mapprune.data import DATASETS, LAYOUTS, cache_dir, clean_subset, from_numpy, load_dataset, split_holdout
from mapprune.errors import MapPruneError

RNG = np.random.default_rng(0)


# -- writers for each layout ---------------------------------------------------------------------------------
def _pickle_numpy_1x(obj, path: Path) -> None:
    """Pickles like the official CIFAR files: arrays rebuilt via numpy.core.multiarray._reconstruct."""
    data = pickle.dumps(obj, protocol=3)
    # numpy 2 writes numpy._core; the official files (numpy 1.x era) name numpy.core. Protocol 3 stores module
    # names as newline-terminated text (GLOBAL opcode), so the rename keeps the pickle valid.
    data = data.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    path.write_bytes(data)


def write_cifar10(d: Path, n_per_batch: int = 6, n_test: int = 8):
    """CIFAR-10 python-pickle layout; returns (x_train, y_train, x_test, y_test) as flat (N, 3072) rows."""
    d.mkdir(parents=True)
    xs, ys = [], []
    for i in range(1, 6):
        x = RNG.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
        y = [int(v) for v in RNG.integers(0, 10, n_per_batch)]
        _pickle_numpy_1x({b"batch_label": f"training batch {i} of 5".encode(), b"labels": y, b"data": x,
                          b"filenames": [b"f.png"] * n_per_batch}, d / f"data_batch_{i}")
        xs.append(x)
        ys += y
    xt = RNG.integers(0, 256, (n_test, 3072), dtype=np.uint8)
    yt = [int(v) for v in RNG.integers(0, 10, n_test)]
    _pickle_numpy_1x({b"batch_label": b"testing batch 1 of 1", b"labels": yt, b"data": xt}, d / "test_batch")
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    _pickle_numpy_1x({b"num_cases_per_batch": n_per_batch, b"label_names": names, b"num_vis": 3072},
                     d / "batches.meta")
    return np.concatenate(xs), np.array(ys), xt, np.array(yt)


def write_png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


# -- CIFAR-10 / CIFAR-100 pickles ----------------------------------------------------------------------------
@pytest.mark.parametrize("sub", ["", "cifar-10-batches-py", "cifar10/cifar-10-batches-py"])
def test_cifar10_pickle_layout(tmp_path, sub):
    x, y, xt, yt = write_cifar10(tmp_path / sub if sub else tmp_path / "x")
    root = tmp_path if sub else tmp_path / "x"
    ds = load_dataset("cifar10", root)
    assert ds.name == "cifar10"
    assert ds.classes[:3] == ["airplane", "automobile", "bird"] and ds.num_classes == 10
    assert ds.x_train.shape == (30, 3, 32, 32) and ds.x_train.dtype == torch.uint8
    assert ds.x_test.shape == (8, 3, 32, 32)
    assert ds.y_train.dtype == torch.int64
    assert ds.y_train.tolist() == y.tolist() and ds.y_test.tolist() == yt.tolist()
    # Rows are 1024 red, then 1024 green, then 1024 blue values, each row-major.
    assert np.array_equal(ds.x_train.numpy(), x.reshape(-1, 3, 32, 32))
    i, c, r, col = 17, 2, 5, 30
    assert ds.x_train[i, c, r, col].item() == x[i, c * 1024 + r * 32 + col]
    assert np.array_equal(ds.x_test.numpy(), xt.reshape(-1, 3, 32, 32))
    assert ds.hflip is True and ds.image_shape == (3, 32, 32)


def test_cifar100_pickle_layout(tmp_path):
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    x = RNG.integers(0, 256, (200, 3072), dtype=np.uint8)
    y = [i % 100 for i in range(200)]
    xt = RNG.integers(0, 256, (100, 3072), dtype=np.uint8)
    yt = list(range(99, -1, -1))
    (d / "train").write_bytes(pickle.dumps({b"data": x, b"fine_labels": y, b"coarse_labels": [v // 5 for v in y]}))
    (d / "test").write_bytes(pickle.dumps({b"data": xt, b"fine_labels": yt, b"coarse_labels": [v // 5 for v in yt]}))
    names = [f"class{i:03d}".encode() for i in range(100)]
    (d / "meta").write_bytes(pickle.dumps({b"fine_label_names": names, b"coarse_label_names": [b"c"] * 20}))
    ds = load_dataset("cifar100", tmp_path)
    assert ds.num_classes == 100 and ds.classes[7] == "class007"
    assert ds.x_train.shape == (200, 3, 32, 32) and ds.x_test.shape == (100, 3, 32, 32)
    assert ds.y_train.tolist() == y and ds.y_test.tolist() == yt  # fine labels, not coarse
    assert np.array_equal(ds.x_train.numpy(), x.reshape(-1, 3, 32, 32))


class _Evil:
    """Unpickling this calls os.system: a tampered dataset file must never get that far."""

    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


@pytest.mark.parametrize("victim", ["data_batch_1", "test_batch", "batches.meta"])
def test_malicious_cifar_pickle_is_refused_not_run(tmp_path, victim):
    write_cifar10(tmp_path / "c")
    sentinel = tmp_path / "pwned"
    (tmp_path / "c" / victim).write_bytes(pickle.dumps({b"data": _Evil(sentinel), b"labels": [0]}))
    with pytest.raises(MapPruneError, match=f"{victim}.*refusing to load"):
        load_dataset("cifar10", tmp_path / "c")
    assert not sentinel.exists(), "the pickle's payload ran"


@pytest.mark.parametrize("payload", [b"", b"not a pickle at all", pickle.dumps([1, 2, 3]),
                                     pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)})[:40]],
                         ids=["empty", "text", "not-a-dict", "truncated"])
def test_damaged_cifar_pickle_gives_one_clear_error(tmp_path, payload):
    write_cifar10(tmp_path / "c")
    (tmp_path / "c" / "data_batch_3").write_bytes(payload)
    with pytest.raises(MapPruneError, match="data_batch_3"):
        load_dataset("cifar10", tmp_path / "c")


def test_cifar_pickle_with_wrong_shape_or_keys(tmp_path):
    write_cifar10(tmp_path / "c")
    bad = {b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4}
    (tmp_path / "c" / "test_batch").write_bytes(pickle.dumps(bad))
    with pytest.raises(MapPruneError, match=r"shape \(N, 3072\)"):
        load_dataset("cifar10", tmp_path / "c")
    (tmp_path / "c" / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((4, 3072), np.uint8)}))
    with pytest.raises(MapPruneError, match="labels"):
        load_dataset("cifar10", tmp_path / "c")


# -- ImageFolder ---------------------------------------------------------------------------------------------
def test_image_folder_order_and_exact_pixels(tmp_path):
    root = tmp_path / "folder"
    imgs = {}
    # Names chosen so that string order (1, 10, 2, b, a?) differs from numeric order (1, 2, 10, then names).
    for split in ("train", "test"):
        for cls in ("zebra", "ant"):
            for stem in ("10", "2", "1", "b_extra", "a_extra"):
                arr = RNG.integers(0, 256, (6, 5, 3), dtype=np.uint8)  # H=6, W=5: not square on purpose
                write_png(root / split / cls / f"{stem}.png", arr)
                imgs[(split, cls, stem)] = arr
    (root / "train" / "ant" / "notes.txt").write_text("not an image")  # ignored: not an image suffix
    ds = load_dataset("imagefolder", root)
    assert ds.name == "folder"
    assert ds.classes == ["ant", "zebra"]  # sorted class folders = label order
    order = ["1", "2", "10", "a_extra", "b_extra"]
    assert ds.y_train.tolist() == [0] * 5 + [1] * 5 and ds.y_test.tolist() == [0] * 5 + [1] * 5
    assert ds.image_shape == (3, 6, 5)
    for split, x in (("train", ds.x_train), ("test", ds.x_test)):
        expected = np.stack([imgs[(split, cls, s)] for cls in ("ant", "zebra") for s in order]).transpose(0, 3, 1, 2)
        assert np.array_equal(x.numpy(), expected), f"{split} images differ or are out of order"


def test_image_folder_cache_is_used_and_invalidated(tmp_path, monkeypatch):
    monkeypatch.setenv("MAPPRUNE_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "f"
    for split in ("train", "test"):
        for i in range(3):
            write_png(root / split / "c" / f"{i}.png", np.full((4, 4, 3), 10 * i, np.uint8))
    first = load_dataset("imagefolder", root)
    cached = list((cache_dir() / "decoded").glob("*.npz"))
    assert len(cached) == 1 and cache_dir() == tmp_path / "cache"
    assert torch.equal(load_dataset("imagefolder", root).x_train, first.x_train)
    # Replace a middle image (same name): the cache must not hand back the old pixels.
    write_png(root / "train" / "c" / "1.png", np.full((4, 4, 3), 200, np.uint8))
    os.utime(root / "train" / "c" / "1.png", ns=(1, 1))
    again = load_dataset("imagefolder", root)
    assert again.x_train[1].unique().tolist() == [200]


def test_image_folder_errors(tmp_path):
    root = tmp_path / "f"
    write_png(root / "train" / "a" / "0.png", np.zeros((4, 4, 3), np.uint8))
    write_png(root / "train" / "b" / "0.png", np.zeros((4, 4, 3), np.uint8))
    write_png(root / "test" / "a" / "0.png", np.zeros((4, 4, 3), np.uint8))
    ds = load_dataset("imagefolder", root)  # a class absent from test/ is fine
    assert ds.classes == ["a", "b"] and ds.y_test.tolist() == [0]
    write_png(root / "test" / "c" / "0.png", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(MapPruneError, match="classes not in train"):
        load_dataset("imagefolder", root)
    (root / "test" / "c" / "0.png").unlink()
    (root / "test" / "c").rmdir()
    write_png(root / "test" / "a" / "1.png", np.zeros((5, 4, 3), np.uint8))
    with pytest.raises(MapPruneError, match="different sizes"):
        load_dataset("imagefolder", root)
    (root / "test" / "a" / "1.png").write_bytes(b"garbage")
    with pytest.raises(MapPruneError, match="cannot decode image"):
        load_dataset("imagefolder", root)


def test_cifar10_image_folder_needs_ten_classes(tmp_path):
    for split in ("train", "test"):
        write_png(tmp_path / "cifar10" / split / "cat" / "0.png", np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(MapPruneError, match="1 class folders but cifar10 has 10"):
        load_dataset("cifar10", tmp_path)


# -- GTSRB -----------------------------------------------------------------------------------------------------
def _solid(value: int, w: int, h: int) -> Image.Image:
    # A one-colour image stays that colour after any resize, so pixel values identify the image.
    return Image.new("RGB", (w, h), (value, 255 - value, value // 2))


def write_gtsrb(d: Path, test_csv_in_images: bool = False):
    header = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId\n"
    train_vals, train_labels = [], []
    for cid in (0, 1, 42):
        cdir = d / "Final_Training" / "Images" / f"{cid:05d}"
        cdir.mkdir(parents=True)
        rows = []
        for j in range(3):
            v = 7 * len(train_vals) + 1
            w, h = 29 + 5 * j, 31 + 7 * j  # official images are 15..250 pixels, rarely square
            name = f"{j:05d}_{j:05d}.ppm"
            _solid(v, w, h).save(cdir / name)
            rows.append(f"{name};{w};{h};5;5;{w - 5};{h - 5};{cid}\n")
            train_vals.append(v)
            train_labels.append(cid)
        (cdir / f"GT-{cid:05d}.csv").write_text(header + "".join(rows))
    tdir = d / "Final_Test" / "Images"
    tdir.mkdir(parents=True)
    rows, test_vals, test_labels = [], [], []
    for j, cid in enumerate((42, 0, 1, 1)):
        v = 250 - 9 * j
        name = f"{j:05d}.ppm"
        _solid(v, 40 + j, 36).save(tdir / name)
        rows.append(f"{name};{40 + j};36;5;5;30;30;{cid}\n")
        test_vals.append(v)
        test_labels.append(cid)
    csv_dir = tdir if test_csv_in_images else d
    (csv_dir / "GT-final_test.csv").write_text(header + "".join(rows))
    return train_vals, train_labels, test_vals, test_labels


@pytest.mark.parametrize("test_csv_in_images", [False, True])
def test_gtsrb_official_layout(tmp_path, test_csv_in_images):
    tv, tl, sv, sl = write_gtsrb(tmp_path / "GTSRB", test_csv_in_images)
    ds = load_dataset("gtsrb", tmp_path)  # finds DATA/GTSRB
    assert ds.num_classes == 43 and ds.hflip is False
    assert ds.image_shape == (3, 32, 32)
    assert ds.y_train.tolist() == tl and ds.y_test.tolist() == sl
    for x, vals in ((ds.x_train, tv), (ds.x_test, sv)):
        for img, v in zip(x, vals, strict=True):
            assert img[0].unique().tolist() == [v]
            assert img[1].unique().tolist() == [255 - v]
            assert img[2].unique().tolist() == [v // 2]


def test_gtsrb_official_layout_errors(tmp_path):
    d = tmp_path / "GTSRB"
    write_gtsrb(d)
    (d / "GT-final_test.csv").unlink()
    with pytest.raises(MapPruneError, match="GT-final_test.csv"):
        load_dataset("gtsrb", tmp_path)
    write_gtsrb(tmp_path / "g2")
    (tmp_path / "g2" / "Final_Training" / "Images" / "00001" / "GT-00001.csv").unlink()
    with pytest.raises(MapPruneError, match="00001 has no GT-<class>.csv"):
        load_dataset("gtsrb", tmp_path / "g2")
    write_gtsrb(tmp_path / "g3")
    (tmp_path / "g3" / "Final_Test" / "Images" / "00002.ppm").unlink()
    with pytest.raises(MapPruneError, match="00002.ppm"):
        load_dataset("gtsrb", tmp_path / "g3")


# -- npz -------------------------------------------------------------------------------------------------------
def test_npz_layout_nhwc_and_nchw(tmp_path):
    x = RNG.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
    y = np.arange(12) % 4
    xt = RNG.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    yt = np.array([3, 2, 1, 0, 0], dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x_train=x, y_train=y, x_test=xt, y_test=yt, classes=np.array(list("abcd")))
    ds = load_dataset("npz", tmp_path / "d.npz")
    assert ds.name == "d" and ds.classes == ["a", "b", "c", "d"]
    assert np.array_equal(ds.x_train.numpy(), x.transpose(0, 3, 1, 2))
    assert ds.y_test.tolist() == yt.tolist() and ds.y_test.dtype == torch.int64
    np.savez(tmp_path / "n.npz", x_train=x.transpose(0, 3, 1, 2), y_train=y, x_test=xt.transpose(0, 3, 1, 2), y_test=yt)
    ds2 = load_dataset("npz", tmp_path / "n.npz")
    assert torch.equal(ds2.x_train, ds.x_train) and ds2.classes == ["0", "1", "2", "3"]
    # GTSRB accepts the same arrays as DATA/gtsrb/gtsrb32.npz.
    (tmp_path / "gtsrb").mkdir()
    np.savez(tmp_path / "gtsrb" / "gtsrb32.npz", x_train=x, y_train=y, x_test=xt, y_test=yt)
    g = load_dataset("gtsrb", tmp_path)
    assert g.name == "gtsrb" and g.hflip is False and torch.equal(g.x_train, ds.x_train)


def test_npz_errors(tmp_path):
    np.savez(tmp_path / "a.npz", x_train=np.zeros((2, 4, 4, 3), np.uint8), y_train=np.zeros(2))
    with pytest.raises(MapPruneError, match=r"lacks arrays \['x_test', 'y_test'\]"):
        load_dataset("npz", tmp_path / "a.npz")
    (tmp_path / "b.npz").write_bytes(b"garbage")
    with pytest.raises(MapPruneError, match="not a readable npz"):
        load_dataset("npz", tmp_path / "b.npz")
    np.savez(tmp_path / "c.npz", x_train=np.zeros((2, 4, 4, 3), np.uint8), y_train=np.zeros(3),
             x_test=np.zeros((1, 4, 4, 3), np.uint8), y_test=np.zeros(1))
    with pytest.raises(MapPruneError, match="2 images but 3 labels"):
        load_dataset("npz", tmp_path / "c.npz")


def test_from_numpy_checks():
    x = np.zeros((2, 4, 4, 3), np.uint8)
    with pytest.raises(MapPruneError, match="pixels in"):
        from_numpy("t", x.astype(float) + 300, [0, 1], x, [0, 1])
    with pytest.raises(MapPruneError, match="negative labels"):
        from_numpy("t", x, [0, -1], x, [0, 1])
    with pytest.raises(MapPruneError, match="only 1 class names"):
        from_numpy("t", x, [0, 1], x, [0, 1], classes=["a"])
    with pytest.raises(MapPruneError, match="test images"):
        from_numpy("t", x, [0, 1], np.zeros((2, 5, 5, 3), np.uint8), [0, 1])


# -- embedded digits -------------------------------------------------------------------------------------------
def test_embedded_digits():
    ds = load_dataset("digits")
    assert len(ds.y_train) + len(ds.y_test) == 1797
    assert ds.num_classes == 10 and ds.image_shape == (1, 8, 8) and ds.hflip is False
    assert ds.x_train.dtype == torch.uint8 and ds.x_train.max().item() == 255
    assert set(ds.y_train.tolist()) == set(range(10)) == set(ds.y_test.tolist())
    assert abs(len(ds.y_test) / 1797 - 0.3) < 0.01  # stratified 30% test split
    assert load_dataset("digits").fingerprint() == ds.fingerprint()  # the same split every time
    assert len(ds.mean) == 1 and len(ds.std) == 1


# -- missing / unknown ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [n for n in DATASETS if n != "digits"])
def test_missing_dataset_names_path_and_layouts(tmp_path, name):
    where = tmp_path / "nothing-here"
    where.mkdir()
    with pytest.raises(MapPruneError) as e:
        load_dataset(name, where)
    msg = str(e.value)
    assert str(where) in msg and LAYOUTS[name] in msg and "MAPPRUNE_DATA" in msg


def test_missing_dataset_without_a_folder():
    with pytest.raises(MapPruneError, match=r"no cifar10 dataset found \(looked in \(no data folder given\)\)"):
        load_dataset("cifar10")


def test_data_dir_from_environment(tmp_path, monkeypatch):
    write_cifar10(tmp_path / "cifar-10-batches-py")
    monkeypatch.setenv("MAPPRUNE_DATA", str(tmp_path))
    assert len(load_dataset("cifar10").y_train) == 30


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(MapPruneError, match="unknown dataset 'mnist'; valid datasets: cifar10, cifar100, digits"):
        load_dataset("mnist")


# -- clean subsets -------------------------------------------------------------------------------------------
def test_clean_subset_is_class_balanced_and_seeded():
    labels = torch.cat([torch.full((100 * (c + 1),), c) for c in range(4)])[torch.randperm(1000)]
    idx = clean_subset(labels, 0.1, seed=0)
    assert torch.bincount(labels[idx]).tolist() == [10, 20, 30, 40]
    assert torch.equal(idx, idx.sort().values) and len(idx.unique()) == len(idx)
    assert torch.equal(clean_subset(labels, 0.1, seed=0), idx)
    assert not torch.equal(clean_subset(labels, 0.1, seed=1), idx)
    assert torch.equal(clean_subset(labels, 1.0, seed=3), torch.arange(1000))
    assert torch.bincount(labels[clean_subset(labels, 0.001)]).tolist() == [1, 1, 1, 1]  # at least one per class


@pytest.mark.parametrize("ratio", [0, -0.1, 1.5, float("nan")])
def test_clean_subset_ratio_out_of_range(ratio):
    with pytest.raises(MapPruneError, match="clean ratio must be in"):
        clean_subset(torch.arange(10) % 2, ratio)


def test_split_holdout_partitions_the_subset():
    labels = torch.arange(400) % 4
    subset = clean_subset(labels, 0.5, seed=0)
    fit, held = split_holdout(subset, labels, 0.2, seed=0)
    assert len(fit) + len(held) == len(subset)
    assert set(fit.tolist()).isdisjoint(held.tolist())
    assert set(fit.tolist()) | set(held.tolist()) == set(subset.tolist())
    assert torch.bincount(labels[held]).tolist() == [10, 10, 10, 10]


# -- real data (skipped when ../shared/data is absent) -------------------------------------------------------
def test_real_cifar10(shared_data, user_cache):
    if not (shared_data / "cifar10").is_dir():
        pytest.skip(f"no CIFAR-10 at {shared_data / 'cifar10'}")
    ds = load_dataset("cifar10", shared_data)
    assert len(ds.y_train) == 50_000 and len(ds.y_test) == 10_000
    assert ds.image_shape == (3, 32, 32)
    assert ds.classes == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    assert torch.bincount(ds.y_train).tolist() == [5000] * 10
    assert torch.bincount(ds.y_test).tolist() == [1000] * 10


def test_real_gtsrb(shared_data):
    if not any((shared_data / "gtsrb").glob("*.npz")) and not (shared_data / "gtsrb" / "Final_Training").is_dir():
        pytest.skip(f"no GTSRB at {shared_data / 'gtsrb'}")
    ds = load_dataset("gtsrb", shared_data)
    assert len(ds.y_train) == 39_209 and len(ds.y_test) == 12_630
    assert ds.num_classes == 43 and ds.image_shape == (3, 32, 32) and ds.hflip is False
    assert set(ds.y_train.tolist()) == set(range(43))
