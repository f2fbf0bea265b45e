"""The stimulation test: each feature map set directly to a high value; where the other classes' images go."""

import copy

import pytest
import torch
from torch import nn

from mapprune.defenses import FMT
from mapprune.errors import MapPruneError
from mapprune.probes import stimulate_maps, target_from_pull


class Wired(nn.Module):
    """A fixed linear read of the pixels (which decides the clean predictions) plus a random conv branch, its
    pooled features standardised on ``x``, whose maps each nudge the logits a little; with ``wire``, channel 0 of
    ``conv`` feeds class 2's logit hard instead (a backdoor's map)."""

    def __init__(self, x: torch.Tensor, wire: bool):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("read", torch.randn(x[0].numel(), 10, generator=g) / 4)
        self.conv = nn.Conv2d(3, 48, 3, padding=1)
        self.norm = nn.BatchNorm1d(48)
        self.head = nn.Linear(48, 10)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.3)
            self.conv.bias.zero_()
            pooled = torch.relu(self.conv(x)).mean((2, 3))
            self.norm.running_mean.copy_(pooled.mean(0))
            self.norm.running_var.copy_(pooled.var(0))
            self.head.weight.copy_(torch.randn(self.head.weight.shape, generator=g) * 0.003)
            self.head.bias.zero_()
            if wire:
                self.head.weight[:, 0] = 0
                self.head.weight[2, 0] = 1.0
        self.eval()

    def forward(self, x):
        return (x.flatten(1) - 0.5) @ self.read + self.head(self.norm(torch.relu(self.conv(x)).mean((2, 3))))


def _images(n=60):
    """Random images, labelled by the unwired model's own predictions (so they are its clean images)."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(n, 3, 8, 8, generator=g)
    with torch.no_grad():
        return x, Wired(x, wire=False)(x).argmax(1)


def test_shares_match_a_plain_loop_and_do_not_depend_on_batching():
    x, y = _images()
    model = Wired(x, wire=True)
    a = stimulate_maps(model, x, y, level=3.0, batch_images=60)  # one map per batch
    b = stimulate_maps(model, x, y, level=3.0, batch_images=6000)  # all 48 maps in one batch
    torch.testing.assert_close(a.shares["conv"], b.shares["conv"])
    # Channel 5 by hand: its clean mean + 3 sd at every position, the rest of the network as usual.
    with torch.no_grad():
        out = model.conv(x)
        v = out[:, 5].mean() + 3 * out[:, 5].std()
        hit = out.clone()
        hit[:, 5] = v
        pred = ((x.flatten(1) - 0.5) @ model.read + model.head(model.norm(torch.relu(hit).mean((2, 3))))).argmax(1)
        base = model(x).argmax(1)
    for j in range(10):
        others = y != j
        want = (pred[others] == j).float().mean() - (base[others] == j).float().mean()
        assert a.shares["conv"][5, j].item() == pytest.approx(want.item(), abs=1e-6)
    assert a.flat().shape == (48, 10) and a.level == 3.0
    model.train()
    stimulate_maps(model, x[:10], y[:10], layers=["conv"])
    assert model.training  # tested in eval mode, handed back as it came


def test_a_wired_map_is_found_and_named():
    x, y = _images()
    wired = stimulate_maps(Wired(x, wire=True), x, y, level=4.0)
    plain = stimulate_maps(Wired(x, wire=False), x, y, level=4.0)
    assert wired.shares["conv"][0, 2] > 0.8  # the wired map sends nearly every other image to class 2
    found, control = target_from_pull(wired.flat()), target_from_pull(plain.flat())
    assert found["target"] == 2 and found["anomaly_index"] > 2 * max(control["anomaly_index"], 1.0)


def test_bad_level_and_unknown_layer_fail_before_any_work():
    x, y = _images(10)
    model = Wired(x, wire=False)
    with pytest.raises(MapPruneError, match="standard deviations"):
        stimulate_maps(model, x, y, level=0)
    with pytest.raises(MapPruneError, match="no testable layer named 'nope'"):
        stimulate_maps(model, x, y, layers=["nope"])
    with pytest.raises(MapPruneError, match="stimulate"):
        FMT(stimulate=-1)
    with pytest.raises(MapPruneError, match="stimulate_images"):
        FMT(stimulate_images=0)


def test_planted_backdoor_shows_and_a_clean_model_does_not(digits_backdoor, tmp_path):
    """On the embedded digits: the BadNets model's maps, stimulated, pull to its target (0) with a larger
    anomaly than any class gets on a model trained the same way without poison."""
    from mapprune.data import clean_subset
    from mapprune.jobs.attack import attack_run
    from mapprune.runs import load_run

    _, bad = digits_backdoor
    attack_run("badnets", tmp_path / "clean", dataset="digits", preset="demo", poison_ratio=0.0, progress=False)
    clean = load_run(tmp_path / "clean")
    idx = clean_subset(bad.dataset.y_train, 0.3, 0)
    x, y = bad.dataset.x_train[idx], bad.dataset.y_train[idx]
    b = FMT(stimulate=3.0).stimulation(bad.model, x, y)
    c = FMT(stimulate=3.0).stimulation(clean.model, x, y)
    assert b["target"] == 0 and b["n_images"] == 30 and b["level"] == 3.0
    assert b["anomaly_index"] > c["anomaly_index"] + 1, (b, c)


def test_fmt_reports_it_and_the_repair_does_not_change(digits_defender):
    model, x, y, _, _ = digits_defender(0.3)
    kw = {"fraction": 1 / 8, "batch_size": 32, "epochs": 2, "distill": 0.0}
    on = FMT(**kw).repair(copy.deepcopy(model), x, y)
    off = FMT(stimulate=0, **kw).repair(copy.deepcopy(model), x, y)
    assert set(on.extra["stimulated_target"]) >= {"target", "anomaly_index", "class_pull", "level", "n_images"}
    assert "stimulated_target" not in off.extra and "stimulate" in on.timings
    for p, q in zip(on.model.state_dict().values(), off.model.state_dict().values()):
        assert torch.equal(p, q)  # detection only: the repaired model is the same bit for bit
    assert "stimulated_target" not in FMT(recipe="paper", epochs=1).repair(copy.deepcopy(model), x, y).extra


@pytest.mark.parametrize("arch", ["preactresnet18", "resnet18-bb", "vgg16_bn", "vit"])
def test_replaying_the_upstream_part_changes_nothing(arch):
    """The stimulated batch skips the part of the network before the stimulated layer (its recorded outputs are
    replayed): the logits equal a full forward of the repeated images, on every layer of every architecture
    (resnet18-bb calls one ReLU module before and after a conv: only its earlier calls are replayed)."""
    from mapprune.models import create_model
    from mapprune.probes import channel_dim, map_layers
    from mapprune.probes.stimulation import _replaying, _stimulator, _upstream

    torch.manual_seed(0)
    model = create_model(arch, 10, width=4).eval()
    x = torch.rand(3, 3, 32, 32)
    layers = map_layers(model)
    names = list(layers)
    for name in names[::max(1, len(names) // 6)] + names[-1:]:
        layer = layers[name]
        upstream, out = _upstream(model, layer, x)
        chans = torch.tensor([0, 1])
        values = torch.tensor([2.5, -1.0])
        with torch.no_grad():
            handle = layer.register_forward_hook(_stimulator(chans, values, channel_dim(layer), len(x)))
            try:
                full = model(x.repeat(2, 1, 1, 1))
                with _replaying(upstream + [(layer, out)], 2):
                    fast = model(x.repeat(2, 1, 1, 1))
            finally:
                handle.remove()
        torch.testing.assert_close(fast, full, rtol=1e-4, atol=1e-5, msg=f"{arch} {name}")
        assert not any("forward" in vars(m) for m in model.modules())  # every module restored
