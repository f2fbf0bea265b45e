"""TaCT (Tang et al., USENIX Security 2021): the trigger's pixels and geometry on any image size, payload drawn from
the source classes with the target label and cover drawn from the cover classes with their own labels, the ASR set
holding source-class images only, bad settings refused in one line, and on the digits a backdoor that fires on the
source classes and much less on the others once cover samples are there."""

import warnings

import pytest
import torch

from mapprune.attacks import ATTACKS, create_attack
from mapprune.attacks.tact import TaCT, other_class_flip_rate, square_geometry
from mapprune.errors import MapPruneError, MapPruneWarning
from mapprune.metrics import evaluate


def _labels(n=1000, k=10):
    return torch.arange(n) % k  # 100 images of each class


def _images(n, shape=(3, 32, 32), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8)


def test_tact_is_registered_with_the_published_defaults():
    atk = create_attack("tact", (3, 32, 32), 10)
    assert ATTACKS.get("tact") is TaCT
    assert atk.config() == {"name": "tact", "target": 0, "all_to_all": False, "poison_ratio": 0.003,
                            "clean_label": False, "source_classes": [1], "cover_classes": [5, 7],
                            "cover_ratio": 0.003, "trigger_seed": 0}


def test_trigger_is_an_opaque_8x8_square_at_rows_and_cols_21_to_28_on_32x32():
    atk = create_attack("tact", (3, 32, 32), 10)
    x = _images(6)
    out = atk.apply(x)
    square = (slice(None), slice(None), slice(21, 29), slice(21, 29))
    expected = (atk.pattern * 255).round().to(torch.uint8)
    assert (out[square] == expected).all()  # every image gets the same colours there, whatever it was
    outside = torch.ones(32, 32, dtype=torch.bool)
    outside[21:29, 21:29] = False
    assert torch.equal(out[:, :, outside], x[:, :, outside])
    assert torch.equal(atk.mask, torch.ones(1, 8, 8))


def test_black_pattern_pixels_stay_part_of_the_trigger():
    atk = create_attack("tact", (1, 32, 32), 10)
    atk.load_state({"pattern": torch.zeros(1, 8, 8), "mask": torch.ones(1, 8, 8)})
    out = atk.apply(torch.full((2, 1, 32, 32), 200, dtype=torch.uint8))
    assert (out[:, :, 21:29, 21:29] == 0).all() and (out[:, :, :21] == 200).all()


@pytest.mark.parametrize(("shape", "rows", "cols"), [((1, 8, 8), (5, 2), (5, 2)), ((1, 28, 28), (18, 7), (18, 7)),
                                                     ((3, 64, 64), (42, 16), (42, 16)),
                                                     ((3, 16, 24), (10, 4), (16, 6)), ((1, 2, 2), (1, 1), (1, 1))])
def test_trigger_square_scales_by_fraction_of_each_side(shape, rows, cols):
    assert (square_geometry(shape[1]), square_geometry(shape[2])) == (rows, cols)
    atk = create_attack("tact", shape, 10)
    x = torch.zeros(3, *shape, dtype=torch.uint8)
    changed = (atk.apply(x) != x).any(0).any(0) | (atk.apply(x + 255) != x + 255).any(0).any(0)
    region = torch.zeros(shape[1:], dtype=torch.bool)
    region[rows[0]:rows[0] + rows[1], cols[0]:cols[0] + cols[1]] = True
    assert torch.equal(changed, region)


def test_trigger_colours_come_from_the_trigger_seed():
    a, b = (create_attack("tact", (3, 32, 32), 10, trigger_seed=s) for s in (3, 4))
    assert torch.equal(a.pattern, create_attack("tact", (3, 32, 32), 10, trigger_seed=3).pattern)
    assert not torch.equal(a.pattern, b.pattern)


def test_payload_is_drawn_from_source_classes_and_relabelled_to_the_target():
    y = _labels()
    atk = create_attack("tact", (3, 8, 8), 10, source_classes=[1, 2], poison_ratio=0.05, cover_ratio=0.03)
    payload, cover = atk.draw_payload_cover(y, seed=4)
    assert len(payload) == 50 and len(cover) == 30  # round(ratio * N) of the whole training set
    assert set(y[payload].tolist()) <= {1, 2} and set(y[cover].tolist()) <= {5, 7}
    assert not set(payload.tolist()) & set(cover.tolist())
    x = _images(len(y), shape=(3, 8, 8))
    xp, yp, idx = atk.poison_train(x, y, seed=4)
    assert torch.equal(idx, torch.cat([payload, cover]).sort().values)
    assert torch.equal(idx, atk.poison_indices(y, seed=4))
    assert (yp[payload] == 0).all()
    assert torch.equal(xp[payload], atk.apply(x[payload]))


def test_cover_keeps_its_true_labels_and_carries_the_same_trigger():
    y = _labels()
    atk = create_attack("tact", (3, 8, 8), 10, poison_ratio=0.05, cover_ratio=0.1)
    x = _images(len(y), shape=(3, 8, 8))
    xp, yp, idx = atk.poison_train(x, y, seed=0)
    payload, cover = atk.draw_payload_cover(y, seed=0)
    assert len(cover) == 100 and set(y[cover].tolist()) == {5, 7}
    assert torch.equal(yp[cover], y[cover]) and torch.equal(xp[cover], atk.apply(x[cover]))
    untouched = torch.ones(len(y), dtype=torch.bool)
    untouched[idx] = False
    assert torch.equal(xp[untouched], x[untouched]) and torch.equal(yp[untouched], y[untouched])
    assert torch.equal(x, _images(len(y), shape=(3, 8, 8)))  # the inputs are left as they were


def test_recorded_poison_indices_split_back_into_payload_and_cover_by_clean_label():
    y = _labels()
    atk = create_attack("tact", (3, 8, 8), 10, source_classes=[1, 3], cover_classes=[2, 8, 9], poison_ratio=0.1,
                        cover_ratio=0.2)
    _, _, idx = atk.poison_train(_images(len(y), shape=(3, 8, 8)), y, seed=2)
    payload, cover = atk.split_poison(y, idx)
    assert [torch.equal(a, b) for a, b in zip((payload, cover), atk.draw_payload_cover(y, seed=2))] == [True, True]


def test_zero_cover_ratio_draws_payload_only():
    y = _labels()
    atk = create_attack("tact", (3, 8, 8), 10, poison_ratio=0.02, cover_ratio=0.0)
    payload, cover = atk.draw_payload_cover(y, seed=0)
    assert len(payload) == 20 and len(cover) == 0
    none = create_attack("tact", (3, 8, 8), 10, poison_ratio=0.02, cover_ratio=0.0, cover_classes=[])
    assert torch.equal(none.poison_indices(y, seed=0), payload)


def test_asr_set_holds_source_class_test_images_only():
    y = _labels(200)
    x = _images(len(y), shape=(1, 8, 8))
    atk = create_attack("tact", (1, 8, 8), 10, source_classes=[1, 4], target=2)
    xb, yt, yy = atk.backdoor_test(x, y)
    keep = (y == 1) | (y == 4)
    assert torch.equal(yy, y[keep]) and (yt == 2).all() and torch.equal(xb, atk.apply(x[keep]))
    sets = atk.test_sets(x, y)
    assert torch.equal(sets["backdoor"][2], yy) and torch.equal(sets["clean"][1], y)
    xo, to, yo = sets["other_classes"]  # neither a source nor the target; cover classes included
    assert set(yo.tolist()) == {0, 3, 5, 6, 7, 8, 9} and len(yo) == 140 and (to == 2).all()
    assert torch.equal(xo, atk.apply(x[~keep & (y != 2)]))


@pytest.mark.parametrize(("kw", "msg"), [
    ({"source_classes": [0, 1]}, "target 0 is among the source classes"),
    ({"source_classes": [1, 5]}, r"classes \[5\] are both source and cover"),
    ({"cover_classes": [0, 5]}, "target 0 is among the cover classes"),
    ({"source_classes": [10]}, r"source classes \[10\] are out of range: classes go from 0 to 9"),
    ({"cover_classes": [-1, 5]}, r"cover classes \[-1\] are out of range"),
    ({"source_classes": []}, "at least one source class"),
    ({"source_classes": "one"}, "class numbers"),
    ({"source_classes": [True]}, "class numbers"),
    ({"cover_classes": [], "cover_ratio": 0.01}, "needs cover classes"),
    ({"cover_ratio": 1.5}, r"cover_ratio must be in \[0, 1\]"),
    ({"trigger_seed": -1}, "trigger_seed"),
    ({"all_to_all": True}, "all-to-one"),
])
def test_bad_settings_are_refused_in_one_line(kw, msg):
    with pytest.raises(MapPruneError, match=msg) as e:
        create_attack("tact", (3, 32, 32), 10, **kw)
    assert "\n" not in str(e.value)


def test_class_options_take_a_number_a_list_or_a_comma_separated_string():
    atk = create_attack("tact", (3, 32, 32), 10, source_classes="2,1", cover_classes=6)
    assert atk.source_classes == [1, 2] and atk.cover_classes == [6]


def test_more_payload_than_source_images_is_refused_and_all_of_them_warns():
    y = _labels()  # 100 images of class 1
    with pytest.raises(MapPruneError, match="asks for 200 training images but classes \\[1\\] have 100"):
        create_attack("tact", (3, 8, 8), 10, poison_ratio=0.2).draw_payload_cover(y, seed=0)
    with pytest.warns(MapPruneWarning, match="every training image of source classes"):
        create_attack("tact", (3, 8, 8), 10, poison_ratio=0.1).draw_payload_cover(y, seed=0)


def test_saved_trigger_reloads_and_a_wrong_sized_one_is_refused():
    atk = create_attack("tact", (3, 32, 32), 10, trigger_seed=5)
    again = create_attack("tact", (3, 32, 32), 10)
    again.load_state(atk.state())
    x = _images(4)
    assert torch.equal(again.apply(x), atk.apply(x))
    with pytest.raises(MapPruneError, match="belongs to another dataset"):
        create_attack("tact", (3, 8, 8), 10).load_state(atk.state())


# -- on the digits: a backdoor specific to the source classes ------------------------------------------------------
# Four source and four cover classes: with a single source class the small CNN keeps the 2x2 trigger
# source-specific even without cover samples (measured flip rate 9% against 6% with them), so the cover's effect is
# shown where the payload spans several classes. 10% payload and 10% cover of the 1,257 training images.
SPREAD = {"source_classes": [1, 2, 3, 4], "cover_classes": [5, 6, 7, 8]}


def _digits_run(tmp_path_factory, name, poison_ratio, attack_kw):
    from mapprune.jobs.attack import attack_run
    from mapprune.runs import load_run

    out = tmp_path_factory.mktemp(name) / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MapPruneWarning)
        attack_run("tact", out, dataset="digits", preset="demo", progress=False, poison_ratio=poison_ratio,
                   attack_kw=attack_kw)
    run = load_run(out)
    tests = run.test_sets()
    return run, evaluate(run.model, tests), other_class_flip_rate(run.model, tests)


@pytest.fixture(scope="module")
def covered(tmp_path_factory):
    return _digits_run(tmp_path_factory, "tact-cover", 0.1, {**SPREAD, "cover_ratio": 0.1})


def test_digits_backdoor_fires_on_source_classes_and_rarely_on_others(covered):
    run, metrics, flip = covered
    assert metrics["acc"] > 0.95 and metrics["asr"] > 0.9 and flip < 0.15
    assert run.attack.source_classes == [1, 2, 3, 4] and run.attack.cover_ratio == 0.1  # reloaded by name
    payload, cover = run.attack.split_poison(run.dataset.y_train, run.poison_indices)
    assert len(payload) == len(cover) == round(0.1 * len(run.dataset.y_train))


def test_digits_without_cover_samples_the_trigger_flips_other_classes_far_more(covered, tmp_path_factory):
    _, metrics, flip = covered
    _, bare_metrics, bare_flip = _digits_run(tmp_path_factory, "tact-bare", 0.1, {**SPREAD, "cover_ratio": 0.0})
    assert bare_metrics["asr"] > 0.9 and bare_flip > 0.3 and bare_flip > 3 * flip


def test_digits_default_classes_give_a_source_specific_backdoor(tmp_path_factory):
    run, metrics, flip = _digits_run(tmp_path_factory, "tact-default", 0.05, {"cover_ratio": 0.1})
    assert metrics["acc"] > 0.95 and metrics["asr"] > 0.9 and flip < 0.15
    assert set(run.dataset.y_train[run.poison_indices].tolist()) == {1, 5, 7}
