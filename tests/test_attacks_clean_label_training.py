"""The clean-label attacks (SIG, LC) really plant a backdoor, and their runs reload.

Not on the 8x8 digits: there the target digit's shape explains its class completely and the model never needs
the trigger (measured ASR: SIG 0-7% even at delta 80 or 30 epochs; LC 0-1% even with PGD at 64/255). Clean-label
attacks work when classes are varied and hard, as on CIFAR-10. So these runs use "digits in clutter": each
digit at a random place on a 16x16 canvas with a random grey level and pixel noise (built here, nothing
downloaded), which the small CNN learns only in part, as a CPU-sized stand-in for a hard dataset.
"""

import numpy as np
import pytest
import torch

from mapprune.data import load_dataset
from mapprune.evaluation import evaluate_run
from mapprune.jobs.attack import attack_run
from mapprune.metrics import predict
from mapprune.runs import load_run


def clutter(x: np.ndarray, rng: np.random.Generator, size: int = 16) -> np.ndarray:
    """uint8 (N, 1, 8, 8) digits -> uint8 (N, 1, size, size): random place, background level and noise."""
    x = x[:, 0].astype(np.float64) / 255
    n = len(x)
    out = rng.uniform(0, 0.4, (n, 1, 1)) + rng.normal(0, 0.08, (n, size, size))
    pos = rng.integers(0, size - 8 + 1, (n, 2))
    ink = rng.uniform(0.5, 1.0, n)
    for i, (oy, ox) in enumerate(pos):
        out[i, oy:oy + 8, ox:ox + 8] = np.maximum(out[i, oy:oy + 8, ox:ox + 8], x[i] * ink[i])
    return np.clip(np.rint(out * 255), 0, 255).astype(np.uint8)[:, None]


@pytest.fixture(scope="module")
def clutter_npz(tmp_path_factory):
    d = load_dataset("digits")
    rng = np.random.default_rng(0)
    # Named npz.npz because load_run() reloads a run's data by the dataset's own name, which for an npz is the
    # file's stem: any other name makes evaluate_run() fail with "unknown dataset" (a runs.py limitation).
    path = tmp_path_factory.mktemp("clutter") / "npz.npz"
    np.savez(path, x_train=clutter(d.x_train.numpy(), rng), y_train=d.y_train.numpy(),
             x_test=clutter(d.x_test.numpy(), rng), y_test=d.y_test.numpy())
    return path


# Measured on this setup (seed 0): SIG ACC 0.60 ASR 0.96; LC ACC 0.58 ASR 0.97 (0.93 without its PGD step);
# for comparison BadNets ACC 0.65 ASR 0.91. Clean non-target images go to the target at most 0.4% of the time.
@pytest.mark.parametrize(("name", "kw"), [
    ("sig", {}),
    ("lc", {"surrogate": "smallcnn", "surrogate_width": 16, "surrogate_epochs": 2}),
])
def test_clean_label_backdoor_planted_and_reloads(tmp_path, clutter_npz, name, kw):
    from mapprune.errors import MapPruneWarning

    out = tmp_path / name
    with pytest.warns(MapPruneWarning, match="covers all 125 training images of class 0"):
        m = attack_run(name, out, dataset="npz", data_dir=clutter_npz, preset="demo", width=16, progress=False,
                       attack_kw=kw)
    r = m["metrics"]
    assert m["attack"]["clean_label"] and m["poison"]["count"] > 0
    # 10% of 1,258 digits is more than the 125 zeros: every target-class image is poisoned, and the user is told.
    assert m["poison"]["target_class_share"] == 1.0
    assert r["acc"] > 0.4 and r["asr"] > 0.8, r  # chance is 0.1
    run = load_run(out)
    x, y = run.dataset.x_test, run.dataset.y_test
    # The trigger, not a model that says "0" to everything: clean non-target images rarely go to the target.
    assert (predict(run.model, x[y != 0]) == 0).float().mean() < 0.3
    poisoned = run.poison_indices
    assert (run.dataset.y_train[poisoned] == 0).all()  # clean-label: only target images were poisoned
    again = evaluate_run(out)  # the trigger re-created from attack.safetensors + manifest alone
    assert {k: again[k] for k in r} == r


def test_partial_target_class_share_is_recorded_without_warning():
    import warnings

    from mapprune.attacks import create_attack
    from mapprune.errors import MapPruneWarning
    from mapprune.jobs.attack import _warn_if_target_class_consumed

    y = torch.arange(10).repeat(100)  # 100 images per class
    for ratio, share, warned in ((0.05, 0.5, False), (0.1, 1.0, True), (0.5, 1.0, True)):
        atk = create_attack("sig", (3, 8, 8), 10, poison_ratio=ratio)
        n = len(atk.poison_indices(y, seed=0))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert _warn_if_target_class_consumed(atk, y, n, 10) == share
        hits = [w for w in caught if issubclass(w.category, MapPruneWarning) and "sig is clean-label" in str(w.message)]
        assert bool(hits) is warned
    assert _warn_if_target_class_consumed(create_attack("badnets", (3, 8, 8), 10), y, 100, 10) is None
