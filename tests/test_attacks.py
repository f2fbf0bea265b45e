"""Attacks: exact trigger pixels, the poisoning rule and the backdoor test set."""

import pytest
import torch

from mapprune.attacks import ATTACKS, create_attack
from mapprune.attacks.blended import make_pattern
from mapprune.errors import MapPruneError


def images(n=20, shape=(3, 32, 32), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 200, (n, *shape), generator=g, dtype=torch.uint8)  # < 255 so white is visible


def labels(n=1000, k=10):
    return torch.arange(n) % k


def test_registry():
    assert {"badnets", "blended", "sig", "wanet", "lowfreq", "lc"} <= set(ATTACKS)
    with pytest.raises(MapPruneError,
                       match="unknown attack 'nope'; valid attacks: adap-blend, adap-patch, badnets, blended, bpp, bypass, "):
        create_attack("nope", (3, 32, 32), 10)


def test_badnets_3x3_white_bottom_right_on_32x32():
    atk = create_attack("badnets", (3, 32, 32), 10)
    x = images()
    out = atk.apply(x)
    assert out.dtype == torch.uint8 and out.shape == x.shape
    assert (out[:, :, -3:, -3:] == 255).all()
    mask = torch.ones(32, 32, dtype=torch.bool)
    mask[-3:, -3:] = False
    assert torch.equal(out[:, :, mask], x[:, :, mask])  # every other pixel untouched
    assert torch.equal(x, images())  # the input is not modified
    assert atk.config()["patch_size"] == 3


@pytest.mark.parametrize(("shape", "size"), [((1, 8, 8), 1), ((3, 64, 64), 6), ((1, 28, 28), 3), ((3, 16, 24), 2)])
def test_badnets_patch_scales_with_image_size(shape, size):
    atk = create_attack("badnets", shape, 10)
    x = images(4, shape)
    out = atk.apply(x)
    assert atk.patch_size == size
    assert (out[:, :, -size:, -size:] == 255).all()
    changed = (out != x).any(dim=(0, 1))
    assert changed.sum().item() == size * size and changed[-size:, -size:].all()


def test_blended_formula_alpha_02():
    atk = create_attack("blended", (3, 32, 32), 10)
    assert atk.alpha == 0.2
    x = images(8)
    p = atk.pattern.double()
    expected = ((0.8 * x.double() / 255 + 0.2 * p) * 255).round()
    got = atk.apply(x).double()
    # float32 arithmetic may land on the other side of a .5 rounding boundary, never further off
    assert (got - expected).abs().max().item() <= 1
    assert (got == expected).double().mean().item() > 0.999
    # x' - 0.8 x is the same pattern for every image
    assert torch.allclose(got[0] - 0.8 * x[0].double(), got[1] - 0.8 * x[1].double(), atol=1.01)


def test_blended_pattern_deterministic_and_saved():
    a = make_pattern((3, 32, 32), 20240101)
    assert torch.equal(a, make_pattern((3, 32, 32), 20240101))
    assert not torch.equal(a, make_pattern((3, 32, 32), 1))
    assert a.min().item() >= 0 and a.max().item() <= 1 and a.std().item() > 0.05
    atk = create_attack("blended", (3, 32, 32), 10)
    assert torch.equal(atk.state()["pattern"], a)
    other = create_attack("blended", (3, 32, 32), 10, pattern_seed=5)
    other.load_state(atk.state())  # what reloading a run does
    assert torch.equal(other.apply(images()), atk.apply(images()))


# The attacks with base.Attack's plain rule and a fixed trigger; the others (clean-label, WaNet's noise images,
# triggers built in prepare()) are tested in their own files.
@pytest.mark.parametrize("name", ["badnets", "blended"])
def test_poisoning_all_to_one(name):
    atk = create_attack(name, (3, 8, 8), 10, target=3, poison_ratio=0.1)
    y = labels()
    x = images(1000, (3, 8, 8))
    px, py, idx = atk.poison_train(x, y, seed=0)
    assert len(idx) == round(0.1 * 1000)
    assert torch.equal(idx, idx.sort().values) and len(idx.unique()) == len(idx)
    assert (y[idx] != 3).all()  # dirty-label all-to-one poisons non-target images
    assert (py[idx] == 3).all()
    rest = torch.ones(1000, dtype=torch.bool)
    rest[idx] = False
    assert torch.equal(py[rest], y[rest]) and torch.equal(px[rest], x[rest])
    assert torch.equal(px[idx], atk.apply(x[idx]))
    assert torch.equal(y, labels())  # inputs untouched
    # seeded: same seed, same images; another seed, other images
    assert torch.equal(atk.poison_train(x, y, seed=0)[2], idx)
    assert not torch.equal(atk.poison_indices(y, seed=1), idx)


@pytest.mark.parametrize(("n", "ratio"), [(1797, 0.1), (50, 0.05), (999, 0.333), (10, 0.0), (10, 1.0)])
def test_poison_count_is_rounded(n, ratio):
    atk = create_attack("badnets", (1, 8, 8), 10, poison_ratio=ratio, all_to_all=True)
    assert len(atk.poison_indices(labels(n), seed=0)) == round(ratio * n)


def test_poisoning_all_to_all():
    atk = create_attack("badnets", (3, 8, 8), 10, all_to_all=True, poison_ratio=0.2)
    y = labels()
    _, py, idx = atk.poison_train(images(1000, (3, 8, 8)), y, seed=0)
    assert len(idx) == 200
    assert torch.equal(py[idx], (y[idx] + 1) % 10)
    assert set(y[idx].tolist()) == set(range(10))  # draws from every class, target included


def test_backdoor_test_set_all_to_one_excludes_target():
    atk = create_attack("badnets", (3, 8, 8), 10, target=2)
    y = labels(100)
    x = images(100, (3, 8, 8))
    xb, yt, yy = atk.backdoor_test(x, y)
    assert len(yy) == 90 and (yy != 2).all()
    assert (yt == 2).all()
    assert torch.equal(yy, y[y != 2])
    assert torch.equal(xb, atk.apply(x[y != 2]))


def test_backdoor_test_set_all_to_all():
    atk = create_attack("blended", (3, 8, 8), 10, all_to_all=True)
    y = labels(100)
    xb, yt, yy = atk.backdoor_test(images(100, (3, 8, 8)), y)
    assert torch.equal(yy, y) and torch.equal(yt, (y + 1) % 10) and len(xb) == 100


@pytest.mark.parametrize("ratio", [-0.1, 1.01, float("nan")])
def test_poison_ratio_out_of_range(ratio):
    with pytest.raises(MapPruneError, match="poison ratio must be in"):
        create_attack("badnets", (3, 32, 32), 10, poison_ratio=ratio)


@pytest.mark.parametrize("target", [-1, 10, 43])
def test_bad_target(target):
    with pytest.raises(MapPruneError, match=r"target label must be in \[0, 9\]"):
        create_attack("blended", (3, 32, 32), 10, target=target)


def test_config_records_everything():
    cfg = create_attack("blended", (3, 32, 32), 43, target=5, poison_ratio=0.05).config()
    assert cfg == {"name": "blended", "target": 5, "all_to_all": False, "poison_ratio": 0.05, "clean_label": False,
                   "alpha": 0.2, "pattern_seed": 20240101}
