"""FMT's testing phase: the fast implementation gives exactly the reference loop's scores."""

import pytest
import torch
from torch import nn

from mapprune.errors import MapPruneError
from mapprune.models import create_model
from mapprune.probes import conv_layers, probe_feature_maps, score_feature_maps


def _calibrated(model: nn.Module, shape, seed=0) -> nn.Module:
    """A random model with non-trivial BatchNorm running statistics, in eval mode."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # exact averages of the calibration batches, not 10% steps away from 0 and 1
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(_smooth_images(32, shape, g))
    return model.eval()


def _smooth_images(n, shape, g):
    """Random images with large-scale structure, so deep features differ between images."""
    c, h, w = shape
    coarse = torch.rand(n, c, max(1, h // 8), max(1, w // 8), generator=g)
    return torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear").clamp(0, 1)


# The reference loop attacks one map at a time, so its cost is the number of maps times a whole model's pass: the
# comparisons run a width-4 PreActResNet18 (the real layout, 1x1 shortcuts included) on 16x16 images.
SMALL = (3, 16, 16)


# Three probes in two implementations: the stem, a strided shortcut and the last conv stand for every kind of layer.
FEW_LAYERS = ["net.conv1", "net.layer2.0.shortcut.0", "net.layer4.1.conv2"]


def _small_resnet() -> nn.Module:
    return _calibrated(create_model("preactresnet18", 10, width=4), SMALL)


def _images_and_own_labels(model, n, shape, seed=1):
    """Images labelled with the model's own predictions: clean accuracy is 100%, so scores are informative."""
    x = _smooth_images(n, shape, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        y = model(x).argmax(1)
    return x, y


@pytest.mark.parametrize(
    ("name", "width", "size", "eps"), [("preactresnet18", 8, 16, 0.06), ("vgg16_bn", 4, 32, 0.06)],
    ids=["preactresnet18-w8", "vgg16_bn-w4"],
)
def test_fast_equals_reference(name, width, size, eps):
    # Small widths and images keep the reference loop fast (see SMALL); VGG needs 32 pixels for its five poolings.
    torch.manual_seed(0)
    model = _calibrated(create_model(name, 10, width=width), (3, size, size))
    x, y = _images_and_own_labels(model, 8, (3, size, size))
    # batch_images=24 makes chunks of 3 maps, so chunk edges and remainders are exercised too.
    fast = score_feature_maps(model, x, y, eps=eps, alpha=0.02, seed=3, implementation="fast", batch_images=24)
    ref = score_feature_maps(model, x, y, eps=eps, alpha=0.02, seed=3, implementation="reference")
    assert list(fast) == list(ref) == list(conv_layers(model))
    for layer in ref:
        assert fast[layer].shape == (conv_layers(model)[layer].out_channels,)
        torch.testing.assert_close(fast[layer], ref[layer], rtol=0, atol=0, msg=f"layer {layer}")
    allscores = torch.cat(list(ref.values()))
    assert allscores.std() > 0, "scores must vary between maps for this comparison to mean anything"
    assert ((allscores >= 0) & (allscores <= 1)).all()


def test_scores_depend_on_seed_and_eps_and_are_deterministic():
    torch.manual_seed(0)
    model = _calibrated(create_model("smallcnn", 10, width=8, in_channels=1), (1, 8, 8))
    x, y = _images_and_own_labels(model, 16, (1, 8, 8))
    a = score_feature_maps(model, x, y, seed=0)
    b = score_feature_maps(model, x, y, seed=0)
    assert all(torch.equal(a[k], b[k]) for k in a)
    zero = score_feature_maps(model, x, y, eps=0.0, alpha=0.0)
    # No perturbation at all: every map keeps the clean accuracy, which is 100% by construction.
    assert all(torch.equal(v, torch.ones_like(v)) for v in zero.values())
    big = score_feature_maps(model, x, y, eps=0.5)
    assert torch.cat(list(big.values())).mean() < 1.0


def test_model_state_is_restored():
    model = _calibrated(create_model("smallcnn", 10, width=8, in_channels=1), (1, 8, 8))
    model.train()
    x, y = _images_and_own_labels(model.eval(), 4, (1, 8, 8))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    score_feature_maps(model, x, y)
    assert model.training
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "BN stats must not move"


class _OddCNN(nn.Module):
    """Not one of ours: conv biases, groups, dilation, no BatchNorm, a conv reused twice, names of its own."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=4)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))

    def forward(self, x):
        x = torch.relu(self.stem(x))
        return self.head(torch.relu(self.grouped(x)))


def test_any_conv_module_works_and_is_keyed_by_name():
    torch.manual_seed(0)
    model = _OddCNN().eval()
    x, y = _images_and_own_labels(model, 8, (3, 16, 16))
    fast = score_feature_maps(model, x, y, batch_images=16)
    ref = score_feature_maps(model, x, y, implementation="reference")
    assert list(fast) == ["stem", "grouped"]
    assert all(torch.equal(fast[k], ref[k]) for k in fast)


def test_torchvision_model_if_installed():
    tv = pytest.importorskip("torchvision", reason="torchvision is not installed (optional)")
    model = _calibrated(tv.models.resnet18(weights=None, num_classes=10), (3, 32, 32))
    x, y = _images_and_own_labels(model, 4, (3, 32, 32))
    scores = score_feature_maps(model, x, y, layers=["conv1", "layer1.0.conv1", "layer2.0.downsample.0"])
    assert [len(v) for v in scores.values()] == [64, 64, 128]


def test_layers_subset_and_bad_input():
    model = _calibrated(create_model("smallcnn", 10, width=8, in_channels=1), (1, 8, 8))
    x, y = _images_and_own_labels(model, 4, (1, 8, 8))
    names = list(conv_layers(model))
    assert list(score_feature_maps(model, x, y, layers=names[1:2])) == names[1:2]
    with pytest.raises(MapPruneError, match="no Conv2d named"):
        score_feature_maps(model, x, y, layers=["nope"])
    with pytest.raises(MapPruneError, match="implementation"):
        score_feature_maps(model, x, y, implementation="turbo")
    with pytest.raises(MapPruneError, match=r"\[0, 1\]"):
        score_feature_maps(model, x * 4 - 2, y)
    with pytest.raises(MapPruneError, match="labels"):
        score_feature_maps(model, x, y[:2])
    with pytest.raises(MapPruneError, match="no Conv2d"):
        score_feature_maps(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), x, y)
    # uint8 images are accepted as pixels
    u8 = (x * 255).round().to(torch.uint8)
    assert set(score_feature_maps(model, u8, y)) == set(names)


def test_excite_objective_fast_equals_reference():
    torch.manual_seed(0)
    model = _small_resnet()
    x, y = _images_and_own_labels(model, 6, SMALL)
    kw = {"eps": 0.03, "alpha": 0.02, "seed": 1, "objective": "excite", "keep_probs": True}
    fast = probe_feature_maps(model, x, y, implementation="fast", batch_images=18, **kw)
    ref = probe_feature_maps(model, x, y, implementation="reference", **kw)
    for layer in ref.acc:
        torch.testing.assert_close(fast.acc[layer], ref.acc[layer], rtol=0, atol=0, msg=f"layer {layer}")
        torch.testing.assert_close(fast.probs[layer], ref.probs[layer], rtol=1e-4, atol=1e-5)
    mse = probe_feature_maps(model, x, y, eps=0.03, alpha=0.02, seed=1)
    assert any(not torch.equal(mse.acc[k], ref.acc[k]) for k in ref.acc), "excite must step elsewhere than mse"
    with pytest.raises(MapPruneError, match="objective"):
        probe_feature_maps(model, x, y, objective="up")


def test_patch_objective_fast_equals_reference_and_changes_a_patch_only():
    from mapprune.probes import patch_step

    torch.manual_seed(0)
    model = _small_resnet()
    x, y = _images_and_own_labels(model, 6, SMALL)
    kw = {"alpha": 0.0, "seed": 1, "objective": "patch", "keep_probs": True}
    fast = probe_feature_maps(model, x, y, implementation="fast", batch_images=18, **kw)
    ref = probe_feature_maps(model, x, y, implementation="reference", **kw)
    for layer in ref.acc:
        torch.testing.assert_close(fast.probs[layer], ref.probs[layer], rtol=1e-4, atol=1e-5)
        assert torch.equal(fast.candidates[layer].pos, ref.candidates[layer].pos)
        assert torch.equal(fast.candidates[layer].window, ref.candidates[layer].window)
        assert len(fast.candidates[layer]) == len(fast.acc[layer])
    x = torch.rand(3, 3, 32, 32)
    grad = torch.zeros(2, 3, 3, 32, 32)
    grad[0, :, 0, 10:15, 20:25] = 1.0  # map 0 wants red up in one 5x5 window
    grad[1, :, :, 0:5, 0:5] = -1.0  # map 1 wants the top-left corner dark
    out = patch_step(x[:3], grad, 5)
    changed = (out != x[:3].unsqueeze(0)).any(2)  # (maps, images, H, W)
    assert changed[0, :, 10:15, 20:25].any() and not changed[0][:, :10].any() and not changed[0][:, 15:].any()
    assert (out[0, :, 0, 10:15, 20:25] == 1).all() and (out[0, :, 1, 10:15, 20:25] == 0).all()
    assert (out[1, :, :, 0:5, 0:5] == 0).all() and torch.equal(out[1, :, :, 5:], x[:3, :, 5:])


def test_found_patches_stamp_where_they_were_found():
    from mapprune.probes import find_patches

    grad = torch.zeros(2, 4, 3, 16, 16)
    grad[0, :, 0, 2:5, 9:12] = 1.0
    grad[1, :, :, 13:16, 0:3] = -1.0
    patches = find_patches(grad, 3)
    assert patches.pos.tolist() == [[2, 9], [13, 0]]
    assert patches.window[0, 0].eq(1).all() and patches.window[0, 1:].eq(0).all() and patches.window[1].eq(0).all()
    x = torch.full((3, 3, 16, 16), 0.5)
    out = patches.stamp(x, torch.tensor([0, 1, 0]))
    assert torch.equal(x, torch.full_like(x, 0.5)), "stamp must not change its input"
    assert out[0, 0, 2:5, 9:12].eq(1).all() and out[0, 1:, 2:5, 9:12].eq(0).all()
    assert out[1, :, 13:16, 0:3].eq(0).all() and out[1, :, :13].eq(0.5).all()
    changed = (out != 0.5).any(1)
    assert changed.sum(dim=(1, 2)).tolist() == [9, 9, 9]


def test_warp_objective_fast_equals_reference_and_identity_at_zero():
    from mapprune.probes import Warps, flow_warp

    torch.manual_seed(0)
    x = torch.rand(4, 3, 32, 32)
    torch.testing.assert_close(flow_warp(x, torch.zeros(1, 2, 4, 4), 2.0), x, atol=1e-5, rtol=0)
    shifted = flow_warp(x, torch.ones(1, 2, 4, 4), 1.0)  # every control point 1: a one-pixel shift right and down
    torch.testing.assert_close(shifted[..., 1:30, 1:30], x[..., 2:31, 2:31], atol=1e-4, rtol=0)
    model = _small_resnet()
    xs, y = _images_and_own_labels(model, 5, SMALL)
    kw = {"alpha": 0.0, "seed": 1, "objective": "warp", "keep_probs": True, "eps": 1.0}
    fast = probe_feature_maps(model, xs, y, implementation="fast", batch_images=15, **kw)
    ref = probe_feature_maps(model, xs, y, implementation="reference", **kw)
    for layer in ref.acc:
        torch.testing.assert_close(fast.probs[layer], ref.probs[layer], rtol=1e-4, atol=1e-5)
        assert isinstance(fast.candidates[layer], Warps) and torch.equal(fast.candidates[layer].phi, ref.candidates[layer].phi)
    one = fast.candidates["net.conv1"].select(torch.tensor([0]))
    torch.testing.assert_close(one.stamp(xs[:2], torch.tensor([0, 0])), flow_warp(xs[:2], one.phi, 1.0))


def test_smooth_objective_fast_equals_reference_and_stays_smooth_and_bounded():
    from mapprune.probes import Shifts, smooth_shift

    torch.manual_seed(0)
    x = torch.full((2, 3, 32, 32), 0.5)
    torch.testing.assert_close(smooth_shift(x, torch.zeros(1, 3, 8, 8), 0.1), x)
    checker = torch.ones(1, 3, 8, 8)
    checker[..., ::2, :] = -1  # the sharpest field 8 control points can make: rows alternate
    out = smooth_shift(x, checker, 0.1)
    assert (out - x).abs().max() <= 0.1 + 1e-6, "the L-inf size is eps"
    # Low-pass: neighbouring pixels differ by far less than the field's range (a patch would jump by 1).
    assert (out[..., 1:, :] - out[..., :-1, :]).abs().max() < 0.1
    model = _small_resnet()
    xs, y = _images_and_own_labels(model, 5, SMALL)
    kw = {"alpha": 0.0, "seed": 1, "objective": "smooth", "keep_probs": True, "eps": 0.1}
    fast = probe_feature_maps(model, xs, y, implementation="fast", batch_images=15, **kw)
    ref = probe_feature_maps(model, xs, y, implementation="reference", **kw)
    for layer in ref.acc:
        torch.testing.assert_close(fast.probs[layer], ref.probs[layer], rtol=1e-4, atol=1e-5)
        assert isinstance(fast.candidates[layer], Shifts) and torch.equal(fast.candidates[layer].phi, ref.candidates[layer].phi)
        assert fast.candidates[layer].phi.shape[1:] == (3, 4, 4)  # SMOOTH_GRID points per 32 pixels: 4 on 16
    one = fast.candidates["net.conv1"].select(torch.tensor([0]))
    torch.testing.assert_close(one.stamp(xs[:2], torch.tensor([0, 0])), smooth_shift(xs[:2], one.phi, 0.1))


def test_probes_sharing_one_pass_equal_each_probe_alone():
    """FMT's recommended recipe probes patches, warps and smooth fields in one forward and batched backward per
    layer; each result is what that probe gives alone (field gradients up to rounding: the shared input is x0 plus
    each field's exactly-zero change, while a field alone resamples x0)."""
    from mapprune.probes import probe_maps

    torch.manual_seed(0)
    model = _small_resnet()
    xs, y = _images_and_own_labels(model, 5, SMALL)
    probes = {"patch": 0.06, "warp": 1.0, "smooth": 0.06}
    kw = {"alpha": 0.02, "seed": 1, "keep_probs": True, "batch_images": 15, "layers": FEW_LAYERS}
    joint = probe_maps(model, xs, y, probes, **kw)
    for objective, eps in probes.items():
        alone = probe_feature_maps(model, xs, y, objective=objective, eps=eps, **kw)
        for layer in alone.acc:
            a, b = joint[objective].candidates[layer], alone.candidates[layer]
            if objective == "patch":  # the pixel gradient is exactly the patch probe's
                assert torch.equal(a.pos, b.pos) and torch.equal(a.window, b.window)
                assert torch.equal(joint[objective].acc[layer], alone.acc[layer])
            else:
                assert (a.phi == b.phi).float().mean() > 0.99
        torch.testing.assert_close(joint[objective].null_probs, alone.null_probs)
    ref = probe_maps(model, xs, y, probes, implementation="reference", **kw)
    for objective in probes:
        for layer in ref[objective].acc:
            assert (ref[objective].acc[layer] - joint[objective].acc[layer]).abs().max() <= 0.2
    with pytest.raises(MapPruneError, match="mse probe"):
        probe_maps(model, xs, y, {"mse": 0.06, "patch": 0.06})


def test_judged_images_judge_a_probe_on_the_first_images_only():
    """``judged_images`` keeps each map's step (it follows every image's gradient) and evaluates it on the first m
    images: the probabilities, labels and null are exactly the full probe's first m, in both implementations."""
    from mapprune.probes import probe_maps

    torch.manual_seed(0)
    model = _small_resnet()
    xs, y = _images_and_own_labels(model, 6, SMALL)
    y[::2] = (y[::2] + 1) % 10  # some wrong labels, so the judged accuracy is not 1 everywhere
    probes = {"patch": 0.06, "warp": 1.0, "smooth": 0.06}
    kw = {"alpha": 0.02, "seed": 1, "keep_probs": True, "batch_images": 18, "layers": FEW_LAYERS}
    for implementation in ("fast", "reference"):
        full = probe_maps(model, xs, y, probes, implementation=implementation, **kw)
        part = probe_maps(model, xs, y, probes, implementation=implementation,
                          judged_images={"warp": 4, "smooth": 2}, **kw)
        for objective, m in (("patch", 6), ("warp", 4), ("smooth", 2)):
            a, b = part[objective], full[objective]
            assert torch.equal(a.labels, y[:m])
            torch.testing.assert_close(a.null_probs, b.null_probs[:m])
            for layer in b.acc:
                torch.testing.assert_close(a.probs[layer], b.probs[layer][:, :m])
                expected = (b.probs[layer][:, :m].argmax(-1) == y[:m]).float().mean(1)
                torch.testing.assert_close(a.acc[layer], expected)
                if objective != "patch":
                    assert torch.equal(a.candidates[layer].phi, b.candidates[layer].phi)  # the same fields found
    with pytest.raises(MapPruneError, match="not probed"):
        probe_maps(model, xs, y, {"patch": 0.06}, judged_images={"warp": 2})
    with pytest.raises(MapPruneError, match="number of images"):
        probe_maps(model, xs, y, {"patch": 0.06, "warp": 1.0}, judged_images={"warp": 0})


def test_a_field_probes_null_is_a_random_field_of_its_own_kind_and_size():
    """The pull of a warp or smooth probe is measured against a null; with field_null="sign" that null steps every
    pixel by +-eps, which for a 1-pixel warp (eps = 1) is a saturated binary noise image, not a warp at all. The
    "field" null is a random field of the probe's kind: a 1-pixel warp moves pixels without changing their range,
    a smooth field stays within eps and is low-pass."""
    from mapprune.defenses.fmt import FMT
    from mapprune.probes import null_images

    g = torch.Generator().manual_seed(0)
    # A smooth image (a ramp plus a little noise), so a 1-pixel move changes each pixel by ~1/32.
    ramp = torch.linspace(0, 1, 32)
    x0 = (ramp[None, None, None, :] * 0.8 + 0.1 + 0.02 * torch.rand(4, 3, 32, 32, generator=g)).clamp(0, 1)
    sign_warp = null_images("warp", x0, 1.0, 1, "sign")
    assert set(sign_warp.unique().tolist()) <= {0.0, 1.0}  # the old null: noise, whatever the image
    warp = null_images("warp", x0, 1.0, 1, "field")
    assert warp.shape == x0.shape and 0 < (warp - x0).abs().mean() < 0.05
    assert warp.min() >= x0.min() - 1e-6 and warp.max() <= x0.max() + 1e-6  # resampled, not added
    smooth = null_images("smooth", x0, 0.06, 1, "field")
    d = smooth - x0
    assert d.abs().max() <= 0.06 + 1e-6 and d.abs().mean() > 0.01
    # low-pass: neighbouring pixels change alike, unlike +-eps noise
    assert (d[..., 1:] - d[..., :-1]).abs().mean() < 0.2 * (null_images("smooth", x0, 0.06, 1) - x0).abs().mean()
    assert torch.equal(null_images("smooth", x0, 0.06, 1, "field"), smooth)  # seeded
    assert torch.equal(null_images("patch", x0, 0.06, 1, "field"), null_images("patch", x0, 0.06, 1))  # not a field
    with pytest.raises(MapPruneError, match="field_null"):
        FMT(field_null="warp")
    assert FMT().field_null == "sign" and "field_null" not in FMT().params()
    assert FMT.variant_name({"field_null": "field"}) == "fmt-fieldnullfield"
