"""Adap-Blend and Adap-Patch (Qi et al., ICLR 2023): payload and cover samples, the asymmetric training and test
triggers, their geometry on 32x32 and 8x8 images, the backdoor they plant in a small CNN on the digits, and their
runs reloading."""

import pytest
import torch

from mapprune.attacks import ATTACKS, create_attack
from mapprune.errors import MapPruneError

N = 5000  # training-set size of the unit checks: rates x10 of the paper's give its CIFAR-10 counts


def images(n, shape=(3, 32, 32), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8)


def labels(n, k=10):
    return torch.arange(n) % k


def _poison(name, **kw):
    atk = create_attack(name, (3, 32, 32), 10, **kw)
    x, y = images(N), labels(N)
    px, py, idx = atk.poison_train(x, y, seed=0)
    return atk, x, y, px, py, idx


def test_both_are_registered_with_the_papers_rates_as_defaults():
    assert {"adap-blend", "adap-patch"} <= set(ATTACKS)
    blend, patch = create_attack("adap-blend", (3, 32, 32), 10), create_attack("adap-patch", (3, 32, 32), 10)
    assert (blend.poison_ratio, blend.cover_ratio, blend.alpha, blend.test_alpha) == (0.003, 0.003, 0.15, 0.2)
    assert (patch.poison_ratio, patch.cover_ratio, patch.alphas, patch.test_alpha) == (0.003, 0.006,
                                                                                     (0.5, 0.2, 0.5, 0.3), 1.0)
    y = labels(50000)  # CIFAR-10's training-set size: 150 + 150 and 150 + 300 images
    for atk, cover in ((blend, 150), (patch, 300)):
        payload, cov = atk.split_indices(y, seed=0)
        assert (len(payload), len(cov)) == (150, cover) and len(atk.poison_indices(y, seed=0)) == 150 + cover


@pytest.mark.parametrize(("name", "cover_ratio", "cover"), [("adap-blend", 0.03, 150), ("adap-patch", 0.06, 300)])
def test_payload_and_cover_counts_are_exact_disjoint_and_only_they_are_modified(name, cover_ratio, cover):
    atk, x, y, px, py, idx = _poison(name, poison_ratio=0.03, cover_ratio=cover_ratio, target=3)
    payload, cov = atk.payload_indices, atk.cover_indices
    assert (len(payload), len(cov)) == (150, cover)
    assert not set(payload.tolist()) & set(cov.tolist())
    assert torch.equal(idx, torch.cat([payload, cov]).sort().values)  # the recorded ground truth holds both
    modified = torch.nonzero((px != x).flatten(1).any(1)).flatten()
    assert torch.equal(modified, idx)
    assert (py[payload] == 3).all() and torch.equal(py[cov], y[cov])  # cover labels unchanged
    rest = torch.ones(N, dtype=torch.bool)
    rest[idx] = False
    assert torch.equal(py[rest], y[rest])
    assert (y[payload] == 3).any()  # any class may be payload, the target included
    assert torch.equal(x, images(N)) and torch.equal(y, labels(N))  # inputs untouched
    again = create_attack(name, (3, 32, 32), 10, poison_ratio=0.03, cover_ratio=cover_ratio, target=3)
    assert torch.equal(again.poison_train(x, y, seed=0)[0], px)  # seeded
    assert not torch.equal(again.poison_indices(y, seed=1), idx)


def test_adap_blend_masks_exactly_half_of_the_pieces_and_leaves_them_bit_identical():
    atk, x, _, px, _, idx = _poison("adap-blend", poison_ratio=0.03, cover_ratio=0.03)
    keep = atk.kept_pieces
    assert keep.shape == (300, 4, 4)
    assert ((~keep).flatten(1).sum(1) == 8).all()  # 8 of 16 pieces masked out in every image
    assert len({tuple(k.flatten().tolist()) for k in keep}) > 250  # a fresh draw per image
    pixels = atk.piece_pixels(keep)[:, 0]  # (300, 32, 32): the kept pieces' pixels
    assert torch.equal(pixels[:, ::8, ::8], keep) and pixels.flatten(1).sum(1).eq(512).all()  # 8x8-pixel pieces
    before, after = x[idx], px[idx]
    masked = ~pixels.unsqueeze(1).expand_as(before)
    assert torch.equal(after[masked], before[masked])
    expected = (before.double() / 255 * 0.85 + 0.15 * atk.pattern.double()).mul(255).round()
    assert (after.double() - expected).abs()[~masked].max() <= 1  # alpha 0.15 on the kept pieces


def test_adap_blend_test_trigger_is_the_whole_pattern_at_alpha_02():
    atk = create_attack("adap-blend", (3, 32, 32), 10)
    x = images(8)
    expected = (x.double() / 255 * 0.8 + 0.2 * atk.pattern.double()).mul(255).round()
    assert (atk.apply(x).double() - expected).abs().max() <= 1
    xb, yt, _ = atk.training_backdoor_test(x, labels(8))
    assert not torch.equal(xb, atk.apply(x[labels(8) != 0]))  # the test trigger is not the training one
    assert (yt == 0).all()


def test_adap_blend_pieces_scale_with_the_image():
    atk = create_attack("adap-blend", (1, 8, 8), 10)
    keep = atk.draw_pieces(5, torch.Generator().manual_seed(0))
    pixels = atk.piece_pixels(keep)[:, 0]
    assert torch.equal(pixels, keep.repeat_interleave(2, 1).repeat_interleave(2, 2))  # 2x2-pixel pieces
    odd = create_attack("adap-blend", (3, 10, 14), 10)  # edges at i * side // 4: rows 0 2 5 7 10, cols 0 3 7 10 14
    one = torch.zeros(1, 4, 4, dtype=torch.bool)
    one[0, 1, 1] = True
    pixels = odd.piece_pixels(one)[0, 0]
    assert pixels[2:5, 3:7].all() and int(pixels.sum()) == 12
    assert odd.piece_pixels(torch.ones(1, 4, 4, dtype=torch.bool)).all()  # the pieces tile the image


def _box(mask):
    rows, cols = torch.nonzero(mask[0], as_tuple=True)
    return (int(rows.min()), int(rows.max())), (int(cols.min()), int(cols.max())), int(mask.sum())


def test_adap_patch_geometry_on_32x32_is_the_papers():
    atk = create_attack("adap-patch", (3, 32, 32), 10)
    m = atk.train_masks
    assert _box(m[0]) == ((27, 31), (27, 31), 25)
    assert _box(m[1])[:2] == ((1, 13), (18, 30)) and 60 < _box(m[1])[2] < 169  # a logo's shape, not a square
    assert _box(m[2])[2] == 36 and m[2][0, :3, :3].all() and m[2][0, -3:, -3:].all() and m[2][0, :3, -3:].all()
    assert set(atk.train_patterns[2][:, m[2][0].bool()].unique().tolist()) == {0.0, 1.0}  # black and white
    assert _box(m[3]) == ((21, 28), (21, 28), 64)
    test = atk.test_mask[0].bool()
    assert test[27:, :5].all() and test[27:, 27:].all() and test[:3, :3].all() and test[:3, 29:].all()
    assert not (m.sum(0)[0] > 0)[27:, :5].all()  # the bottom-left patch is never seen in training
    assert torch.equal(atk.test_pattern[:, 27:, 27:29], atk.train_patterns[0][:, 27:, 27:29])  # the same patch
    assert torch.equal(atk.test_pattern[:, 29:, 29:], atk.train_patterns[2][:, 29:, 29:])  # checkerboard on top


def test_adap_patch_geometry_scales_to_8x8():
    atk = create_attack("adap-patch", (1, 8, 8), 10)
    m = atk.train_masks
    assert _box(m[0]) == ((5, 7), (5, 7), 9)
    assert _box(m[1])[:2] == ((0, 3), (5, 7))
    assert _box(m[2])[2] == 16 and set(atk.train_patterns[2][:, m[2][0].bool()].unique().tolist()) == {0.0, 1.0}
    assert _box(m[3]) == ((5, 6), (5, 6), 4)
    test = atk.test_mask[0].bool()
    assert test[5:, :3].all() and test[5:, 5:].all() and test[:2, :2].all() and test[:2, 6:].all()
    assert int(test.sum()) == 3 * 3 * 2 + 2 * 2 * 2  # both corner patches and the top checkerboard blocks


def test_each_adap_patch_sample_carries_exactly_one_trigger_by_consecutive_chunks():
    atk, x, _, px, _, idx = _poison("adap-patch", poison_ratio=0.03, cover_ratio=0.06)
    ids = atk.trigger_ids
    for group in (atk.payload_indices, atk.cover_indices):
        at = torch.searchsorted(idx, group)
        for j, chunk in enumerate(torch.tensor_split(at, 4)):
            assert (ids[chunk] == j).all()
    assert torch.bincount(ids).tolist() == [38 + 75, 38 + 75, 37 + 75, 37 + 75]
    changed = px[idx] != x[idx]
    for j in range(4):
        sel = ids == j
        outside = ~atk.train_masks[j].bool().expand(3, 32, 32)
        assert not changed[sel][:, outside].any()  # nothing changed outside trigger j
        assert changed[sel].flatten(1).any(1).all()
        expected = atk.training_trigger(x[idx][sel].float() / 255, j).clamp(0, 1).mul(255).round().to(torch.uint8)
        assert torch.equal(px[idx][sel], expected)


def test_adap_patch_test_trigger_differs_from_every_training_trigger():
    atk = create_attack("adap-patch", (3, 32, 32), 10)
    x = images(8)
    test = atk.apply(x)
    assert torch.equal(test[:, :, 27:, :5], (atk.test_pattern[:, 27:, :5] * 255).round().to(torch.uint8).expand(8, -1, -1, -1))
    for j in range(4):
        train = atk.training_trigger(x.float() / 255, j).mul(255).round().to(torch.uint8)
        assert not torch.equal(train, test)


@pytest.mark.parametrize(("kw", "msg"), [({"cover_ratio": -0.1}, "cover_ratio"), ({"cover_ratio": 1.5}, "cover_ratio"),
                                         ({"poison_ratio": 0.6, "cover_ratio": 0.5}, "poison_ratio \\+ cover_ratio"),
                                         ({"alpha": 0.0}, "alpha"), ({"grid": 9}, "grid"), ({"grid": 1}, "grid")])
def test_bad_adap_blend_settings_are_refused(kw, msg):
    with pytest.raises(MapPruneError, match=msg):
        create_attack("adap-blend", (1, 8, 8), 10, **kw)


def test_bad_adap_patch_settings_are_refused():
    with pytest.raises(MapPruneError, match="alphas"):
        create_attack("adap-patch", (3, 32, 32), 10, alpha_logo=1.5)


# -- a small CNN on the digits: generous rates for a tiny dataset (5% payload + 5% cover) -------------------------


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """name -> (run folder, manifest) of that attack on the digits, trained once per module."""
    from mapprune.jobs.attack import attack_run

    runs = {}

    def get(name):
        if name not in runs:
            out = tmp_path_factory.mktemp(name) / "run"
            m = attack_run(name, out, dataset="digits", preset="demo", progress=False, poison_ratio=0.05,
                           attack_kw={"cover_ratio": 0.05})
            runs[name] = (out, m)
        return runs[name]
    return get


@pytest.mark.parametrize(("name", "asr_min"), [("adap-blend", 0.95), ("adap-patch", 0.7)])
def test_the_backdoor_is_planted_and_fires_on_the_test_trigger_far_more_than_on_the_training_one(
        digits_run, name, asr_min):
    from mapprune.metrics import accuracy, predict
    from mapprune.runs import load_run

    out, m = digits_run(name)
    run = load_run(out)
    xb, yt, _ = run.attack.training_backdoor_test(run.dataset.x_test, run.dataset.y_test)
    asr_training = accuracy(predict(run.model, xb), yt)
    # measured (seeds 0-4): blend ASR 0.996-1.0 against 0.25-0.34 with the training trigger; patch 0.81-0.99
    # against 0.23-0.30; a model trained without poison gives both triggers an ASR below 0.01
    assert m["metrics"]["acc"] > 0.95
    assert m["metrics"]["asr"] > asr_min
    assert m["metrics"]["asr"] - asr_training > 0.4


@pytest.mark.parametrize("name", ["adap-blend", "adap-patch"])
def test_a_run_reloads_with_its_triggers_and_payload_and_cover_apart(digits_run, name):
    from mapprune.checkpoint import load_tensors
    from mapprune.runs import load_run

    out, m = digits_run(name)
    run = load_run(out)
    n = len(run.dataset.y_train)
    fresh = create_attack(name, (1, 8, 8), 10, poison_ratio=0.05, cover_ratio=0.05)
    _, _, idx = fresh.poison_train(run.dataset.x_train, run.dataset.y_train, seed=0)
    assert m["attack"]["cover_ratio"] == 0.05 and m["poison"]["count"] == 2 * round(0.05 * n) == len(idx)
    assert torch.equal(run.poison_indices, idx)
    assert torch.equal(run.attack.payload_indices, fresh.payload_indices)
    assert torch.equal(run.attack.cover_indices, fresh.cover_indices)
    tensors, _ = load_tensors(out / "attack.safetensors")
    assert torch.equal(tensors["state.cover_indices"], fresh.cover_indices)
    x = run.dataset.x_test[:50]
    assert torch.equal(run.attack.apply(x), fresh.apply(x))
    assert torch.equal(run.attack.training_backdoor_test(x, run.dataset.y_test[:50])[0],
                       fresh.training_backdoor_test(x, run.dataset.y_test[:50])[0])
