"""NAD, NC, i-BAU, SAU and FST: their mechanics on hand-made problems and their effect on a really backdoored model."""

import pytest
import torch
from torch import nn

from mapprune.defenses import create_defense
from mapprune.defenses.ibau import hypergradient_loss
from mapprune.defenses.nad import attention, stage_outputs
from mapprune.defenses.nc import ReversedTriggers, anomaly_index
from mapprune.defenses.sau import js_divergence
from mapprune.errors import MapPruneError
from mapprune.models import create_model


@pytest.fixture(scope="module")
def digits(digits_defender):
    """The backdoored digits model, half the training set as the defender's clean subset (8x8 digits give few
    images: at 10% NAD and FST have ~4 batches an epoch), its test sets and its metrics before any defense."""
    return digits_defender(0.5)


def _repaired(digits, name, **kw):
    from mapprune.metrics import evaluate

    model, x, y, tests, before = digits
    result = create_defense(name, **kw).repair(model, x, y)
    return result, evaluate(result.model, tests), before


@pytest.mark.parametrize("name, kw, msg", [
    ("nad", {"teacher_epochs": 0}, "teacher_epochs"), ("nad", {"betas": (1.0, -1.0)}, "betas"),
    ("nad", {"layers": ("a",), "betas": (1.0, 2.0)}, "one beta per layer"),
    ("nc", {"mode": "cut"}, "mode"), ("nc", {"success": 0.0}, "success"), ("nc", {"unlearn": 1.0}, "unlearn"),
    ("ibau", {"portion": 0.0}, "portion"), ("ibau", {"rounds": 0}, "rounds"),
    ("sau", {"eps": 0.0}, "eps"), ("sau", {"lmd2": -1.0}, "loss weights"),
    ("fst", {"alpha": -0.1}, "alpha"),
])
def test_bad_options_fail_before_work(name, kw, msg):
    with pytest.raises(MapPruneError, match=msg):
        create_defense(name, **kw)


def test_nad_distils_the_last_three_stages_of_each_architecture():
    assert stage_outputs(create_model("preactresnet18", 10, width=4)) == ["net.layer2", "net.layer3", "net.layer4"]
    assert stage_outputs(create_model("resnet18", 10, width=4)) == ["net.layer2", "net.layer3", "net.layer4"]
    vgg = create_model("vgg16_bn", 10, width=4)
    names = stage_outputs(vgg)
    modules = dict(vgg.named_modules())
    assert len(names) == 3 and all(isinstance(modules[n], nn.ReLU) for n in names)  # the ends before a pooling
    assert stage_outputs(create_model("smallcnn", 10, in_channels=1)) == ["net.features.5", "net.features.12"]


def test_attention_is_a_unit_map_blind_to_sign_and_scale():
    f = torch.randn(2, 8, 4, 4)
    a = attention(f, 2.0)
    assert a.shape == (2, 16)
    torch.testing.assert_close(a.norm(dim=1), torch.ones(2))
    torch.testing.assert_close(attention(-3 * f, 2.0), a)


def test_nad_removes_the_backdoor_where_the_same_fine_tune_does_not(digits):
    result, after, before = _repaired(digits, "nad", hflip=False, lr=0.02)
    assert after["asr"] < 0.1 and after["acc"] > before["acc"] - 0.05, after
    assert result.extra["layers"] == {"net.features.5": 1000.0, "net.features.12": 1000.0}
    _, plain, _ = _repaired(digits, "nad", hflip=False, lr=0.02, betas=(0.0, 0.0, 0.0))  # no attention term
    assert plain["asr"] > 0.3, plain


def test_fst_keeps_the_head_norm_and_moves_it_away(digits):
    from mapprune.defenses.fp import classifier_head

    model = digits[0]
    result, after, before = _repaired(digits, "fst", hflip=False, lr=0.05)
    old, new = classifier_head(model)[1].weight, classifier_head(result.model)[1].weight
    torch.testing.assert_close(new.norm(), old.norm())
    assert result.extra["head_cosine_to_original"] < 0.5
    assert after["asr"] < 0.1 and after["acc"] > before["acc"] - 0.1, after


def test_hypergradient_matches_the_implicit_function_theorem():
    """inner(d) = d'Ad/2 - (Bw)'d has its fixed point at d* = A^-1 B w; for outer = c'd* + |w|^2/2 the total
    derivative in w is w + B'A^-1 c, which the surrogate loss's gradient must equal."""
    g = torch.Generator().manual_seed(0)
    m, n = 4, 3
    q = torch.randn(m, m, generator=g)
    a = q @ q.T / m + torch.eye(m)
    b, c = torch.randn(m, n, generator=g), torch.randn(m, generator=g)
    w = torch.randn(n, generator=g, requires_grad=True)
    d_star = torch.linalg.solve(a, b @ w).detach()
    leaf = d_star.clone().requires_grad_(True)
    outer = c @ leaf + 0.5 * w @ w
    loss = hypergradient_loss(outer, leaf, lambda d: 0.5 * d @ a @ d - (b @ w) @ d, d_star, step=0.2, k=300)
    torch.testing.assert_close(loss, outer)  # the value is the outer loss
    loss.backward()
    torch.testing.assert_close(w.grad, (w + b.T @ torch.linalg.solve(a, c)).detach(), atol=1e-4, rtol=1e-4)


def test_ibau_unlearns_on_the_defenders_images_only(digits):
    result, after, before = _repaired(digits, "ibau", hflip=False)
    assert len(result.extra["perturbation_norms"]) == 5 and min(result.extra["perturbation_norms"]) > 0
    assert after["asr"] < 0.5 * before["asr"] and after["acc"] > before["acc"] - 0.15, after


def test_js_divergence():
    a, b = torch.randn(5, 10), torch.randn(5, 10)
    assert js_divergence(a, a).abs().max() < 1e-6
    torch.testing.assert_close(js_divergence(a, b), js_divergence(b, a))
    assert bool((js_divergence(a, b) > 0).all()) and bool((js_divergence(a, b) <= torch.log(torch.tensor(2.0))).all())


def test_sau_perturbations_stay_in_the_ball_and_on_images(digits):
    model, x, y = digits[0].eval(), digits[1][:64].float() / 255, digits[2][:64]
    sau = create_defense("sau", eps=0.1)
    xa = sau.shared_pgd(model, model, x, y)
    assert float((xa - x).abs().max()) <= 0.1 + 1e-6 and float(xa.min()) >= 0 and float(xa.max()) <= 1


def test_sau_removes_the_backdoor(digits):
    # BackdoorBench's 100 rounds at lr 1e-4 compressed into 10 at 1e-3 for a test's budget
    _, after, before = _repaired(digits, "sau", hflip=False, rounds=10, lr=1e-3)
    assert after["asr"] < 0.1 and after["acc"] > before["acc"] - 0.05, after


def test_anomaly_index_flags_the_small_outlier_only():
    norms = torch.tensor([2.0, 14.0, 15.0, 16.0, 15.5, 14.5, 13.0, 17.0, 16.5, 15.0])
    out = anomaly_index(norms)
    assert out["flagged"] == [0] and out["anomaly_index"] > 2
    assert anomaly_index(torch.tensor([14.0, 15.0, 16.0, 15.5, 14.5, 30.0]))["flagged"] == []  # large is not a trigger
    assert anomaly_index(torch.full((10,), 5.0))["flagged"] == []


def test_reversed_triggers_blend_their_pattern_through_the_mask():
    mask = torch.zeros(2, 1, 4, 4)
    mask[0, :, 0, 0] = 1.0
    mask[1, :, 3, 3] = 0.5
    pattern = torch.ones(2, 3, 4, 4)
    x = torch.zeros(2, 3, 4, 4)
    out = ReversedTriggers(mask, pattern).stamp(x, torch.tensor([0, 1]))
    assert out[0, :, 0, 0].tolist() == [1.0] * 3 and float(out[0].sum()) == 3
    assert out[1, :, 3, 3].tolist() == [0.5] * 3 and float(out[1].sum()) == 1.5


def _prototypes(seed: int, n: int):
    """Ten classes of noisy 12x12 colour prototypes (2x2 blocks of random colours): a small dataset on which a
    planted corner-patch backdoor is learnt in seconds."""
    protos = torch.rand(10, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    protos = nn.functional.interpolate(protos, size=(12, 12), mode="nearest")
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(10).repeat_interleave(n)
    x = (protos[y] + 0.3 * torch.randn(len(y), 3, 12, 12, generator=g)).clamp(0, 1)
    return (x * 255).round().to(torch.uint8), y


def _prototype_model(poisoned: bool):
    from mapprune.train import TrainConfig, train

    x, y = _prototypes(0, 100)
    if poisoned:  # 10% of the training set: a white 3x3 corner patch, relabelled to class 0
        idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(1))[:len(x) // 10]
        x, y = x.clone(), y.clone()
        x[idx, :, -3:, -3:] = 255
        y[idx] = 0
    torch.manual_seed(0)
    model = create_model("smallcnn", 10, width=16, in_channels=3)
    train(model, x, y, TrainConfig(epochs=20, batch_size=64, lr=0.05, schedule="onecycle", hflip=False),
          progress=False)
    return model.eval()


def test_nc_flags_the_planted_target_above_anything_in_a_clean_model():
    """With a search long enough for the masks to converge (60 epochs here), the backdoored model's class 0 is
    the strongest outlier, stronger than any of the clean model's. (Searches cut short leave the clean classes'
    norms uneven and the rule then flags clean models more often: docs/results.md.)"""
    import copy

    from mapprune.defenses.nc import ReversedTriggers

    x, y = _prototypes(7, 30)
    xt, yt = _prototypes(5, 20)
    xt = xt[yt != 0].clone()
    xt[:, :, -3:, -3:] = 255

    def asr(model):
        with torch.no_grad():
            return float((model(xt.float() / 255).argmax(1) == 0).float().mean())

    found, models = {}, {}
    for poisoned in (True, False):
        nc = create_defense("nc", reverse_epochs=60, n_images=None, hflip=False, epochs=5, batch_size=32)
        models[poisoned] = _prototype_model(poisoned)
        found[poisoned] = nc.repair(models[poisoned], x, y)
    assert asr(models[True]) > 0.9 and asr(found[True].model) < 0.1  # unlearning the reversed trigger
    triggers = ReversedTriggers(found[True].tensors["mask"][:1], found[True].tensors["pattern"][:1])
    pruned_model = copy.deepcopy(models[True])
    pruned, sweep = nc.prune(pruned_model, nc.split(x, y), triggers, [0])
    assert sweep[-1][1] <= nc.prune_stop < sweep[0][1] and len(next(iter(pruned.values()))) == sweep[-1][0]
    assert asr(pruned_model) < asr(models[True])  # the paper's pruning mitigation
    flagged, clean = found[True].extra["detection"], found[False].extra["detection"]
    # the planted target first (smallest norm); a naturally easy class may be flagged after it (class 7 here)
    assert flagged["flagged"][0] == 0 and flagged["anomaly_index"] > 3, flagged
    # The clean model has no outlier as strong as the planted one, and never class 0. Whether its easiest classes
    # pass NC's rule depends on the trained model: none (anomaly < 2) on an AVX-512 CPU; classes 9 and 7 (anomaly
    # 2.9, against 60 or 120 search epochs alike) on an AVX2 one, where the floating point differs. A clean model
    # that is flagged is unlearnt like any other: NC's false positives are real.
    assert 0 not in clean["flagged"] and clean["anomaly_index"] < flagged["anomaly_index"] - 1, (flagged, clean)
    assert found[True].extra["mitigation"] == "unlearn"
    assert ("unchanged" in found[False].extra["mitigation"]) == (clean["flagged"] == [])
    assert found[True].tensors["mask"].shape == (10, 1, 12, 12)
    assert float(found[True].tensors["mask"][0].sum()) == pytest.approx(flagged["norms"][0], rel=1e-3)
