"""FP, CLP, ANP and RNP: their mechanics on hand-made models and their effect on a really backdoored one."""

import pytest
import torch
from torch import nn

from mapprune.defenses import create_defense
from mapprune.defenses.bn_masks import MaskedBatchNorm2d, attach_masks, below, zero_gamma
from mapprune.errors import MapPruneError
from mapprune.models import create_model


@pytest.fixture(scope="module")
def digits(digits_defender):
    return digits_defender(0.1)


@pytest.mark.parametrize("name, kw, msg", [
    ("fp", {"step_ratio": 0.0}, "step_ratio"), ("fp", {"max_drop": 1.0}, "max_drop"),
    ("clp", {"u": -1.0}, "u must be"),
    ("anp", {"eps": -0.1}, "eps"), ("anp", {"iterations": 0}, "iterations"), ("anp", {"threshold": 2.0}, "threshold"),
    ("anp", {"threshold": "best"}, "threshold"), ("rnp", {"unlearn_lr": 0.0}, "learning rates"),
    ("rnp", {"clean_threshold": 1.5}, "clean_threshold"), ("rnp", {"threshold": -0.1}, "threshold"),
])
def test_bad_options_fail_before_work(name, kw, msg):
    with pytest.raises(MapPruneError, match=msg):
        create_defense(name, **kw)


def test_masked_batchnorm_is_the_batchnorm_until_masked():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    x = torch.randn(3, 4, 5, 5)
    m = MaskedBatchNorm2d(bn).eval()
    torch.testing.assert_close(m(x), bn.eval()(x))
    with torch.no_grad():
        m.mask[1] = 0.0
        m.delta.fill_(0.5)
        m.xi.fill_(1.0)
    out = m(x)
    torch.testing.assert_close(out[:, 1], bn.bias[1].expand_as(out[:, 1]))  # gamma masked away, beta kept
    m.perturbed = True
    torch.testing.assert_close(m(x)[:, 1], (bn.weight[1] * 0.5 * (x[:, 1] - bn.running_mean[1])
                                            / (bn.running_var[1] + bn.eps).sqrt() + 2 * bn.bias[1]))


def test_masks_attach_by_name_and_prune_by_gamma():
    model = create_model("preactresnet18", 10, width=8)
    wrapped = attach_masks(model)
    assert "net.layer2.0.bn1" in wrapped and "net.bn" in wrapped
    assert all(not p.requires_grad for n, p in model.named_parameters() if not n.endswith(("mask", "delta", "xi")))
    masks = {"net.layer1.0.bn1": torch.tensor([0.1, 0.9] + [1.0] * 6)}
    assert below(masks, 0.5) == {"net.layer1.0.bn1": [0]}
    fresh = create_model("preactresnet18", 10, width=8)
    zero_gamma(fresh, below(masks, 0.5))
    assert fresh.net.layer1[0].bn1.weight[0] == 0 and fresh.net.layer1[0].bn1.weight[1] != 0
    with pytest.raises(MapPruneError, match="BatchNorm"):
        attach_masks(nn.Sequential(nn.Conv2d(1, 2, 3)))


def test_clp_pairs_each_batchnorm_with_the_conv_it_normalises():
    torch.manual_seed(0)
    model = create_model("preactresnet18", 10, width=8).eval()
    conv = model.net.layer2[0].conv1
    with torch.no_grad():
        conv.weight[3] *= 60  # one channel with a huge Lipschitz bound
    x = torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8)
    y = torch.arange(10).repeat(2)
    result = create_defense("clp").repair(model, x, y)
    pairs = result.extra["batchnorm_of"]
    assert pairs["net.layer2.0.conv1"] == "net.layer2.0.bn2"
    # The public code pairs bn1 of a downsampling block with the shortcut conv registered just before it.
    assert "net.layer2.0.shortcut.0" not in pairs and "net.layer2.0.shortcut.0" in result.extra["skipped_convs"]
    assert 3 in result.pruned["net.layer2.0.conv1"]
    fixed = result.model.net.layer2[0]
    assert fixed.bn2.weight[3] == 0 and fixed.bn2.bias[3] == 0 and fixed.conv1.weight[3].abs().sum() > 0
    resnet = create_defense("clp").repair(create_model("resnet18", 10, width=8), x, y)
    assert resnet.extra["skipped_convs"] == [] and resnet.extra["batchnorm_of"]["net.layer2.0.shortcut.0"] == \
        "net.layer2.0.shortcut.1"


def test_fp_prunes_dormant_channels_within_the_held_out_budget(digits):
    from mapprune.metrics import evaluate

    model, x, y, tests, before = digits
    result = create_defense("fp", hflip=False, batch_size=32).repair(model, x, y)
    (head, channels), = result.pruned.items()
    activation = result.scores[head]
    assert channels and max(activation[channels]) <= min(
        a for c, a in enumerate(activation.tolist()) if c not in channels)  # the least active ones
    assert dict(result.model.named_modules())[head].weight[:, channels].abs().sum() == 0  # kept through fine-tune
    acc0 = result.extra["sweep"][0][1]
    accepted = [a for k, a in result.extra["sweep"][1:] if k <= len(channels)]
    assert all(a >= 0.9 * acc0 for a in accepted)
    after = evaluate(result.model, tests)
    assert after["acc"] > before["acc"] - 0.03 and after["asr"] < before["asr"] - 0.2, after


def test_anp_and_rnp_remove_a_planted_backdoor(digits):
    from mapprune.metrics import evaluate

    model, x, y, tests, before = digits
    anp = create_defense("anp", hflip=False, iterations=150).repair(model, x, y)
    after = evaluate(anp.model, tests)
    assert after["asr"] < before["asr"] - 0.3 and after["acc"] > before["acc"] - 0.1, after
    t = anp.extra["threshold"]
    assert t is not None and all(m[c] <= t for name, cs in anp.pruned.items() for c in cs for m in [anp.scores[name]])

    rnp = create_defense("rnp", hflip=False, threshold="auto").repair(model, x, y)
    after = evaluate(rnp.model, tests)
    assert rnp.extra["unlearn_epochs_run"] >= 1 and rnp.history[-1]["train_acc"] <= 0.2
    assert after["asr"] < 0.2 and after["acc"] > before["acc"] - 0.1, after
    fixed = create_defense("rnp", hflip=False).repair(model, x, y)  # BackdoorBench's fixed 0.7 prunes more
    assert fixed.extra["threshold"] == 0.7 and fixed.num_pruned >= rnp.num_pruned
