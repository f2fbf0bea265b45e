"""FMT's selection rules, pruning, masking, the FT baseline, and repair of a really backdoored model."""

import copy
import math

import pytest
import torch
from torch import nn

from mapprune.defenses import FMT, FineTune, create_defense
from mapprune.defenses.pruning import prune
from mapprune.defenses.selection import select, select_outlier, select_rank
from mapprune.errors import MapPruneError
from mapprune.models import create_model
from mapprune.probes import conv_layers, following_batchnorms


def test_following_batchnorms_preactresnet():
    model = create_model("preactresnet18", 10, width=8)
    bns = following_batchnorms(model, torch.rand(1, 3, 32, 32))
    assert bns["net.conv1"] == "net.layer1.0.bn1"  # the stem feeds the first block's pre-activation BN
    assert bns["net.layer1.0.conv1"] == "net.layer1.0.bn2"
    assert bns["net.layer2.0.conv1"] == "net.layer2.0.bn2"
    # Residual convs feed a sum: no BatchNorm normalises them alone, so none is zeroed with them.
    assert "net.layer1.0.conv2" not in bns
    assert "net.layer2.0.shortcut.0" not in bns


def test_following_batchnorms_resnet_and_vgg():
    resnet = following_batchnorms(create_model("resnet18", 10, width=8), torch.rand(1, 3, 32, 32))
    assert resnet["net.layer2.0.shortcut.0"] == "net.layer2.0.shortcut.1"
    assert resnet["net.layer3.1.conv2"] == "net.layer3.1.bn2"
    vgg_model = create_model("vgg16_bn", 10, width=4)
    vgg = following_batchnorms(vgg_model, torch.rand(1, 3, 32, 32))
    assert len(vgg) == len(conv_layers(vgg_model)) == 13


def test_rank_rule_paper_counts_at_width_64():
    model = create_model("preactresnet18", 10, width=64)
    scores = {name: torch.rand(m.out_channels) for name, m in conv_layers(model).items()}
    chosen = select_rank(scores, min_per_layer=0)
    assert sum(len(v) for v in chosen.values()) == 75  # 1 of 64, 2 of 128, 4 of 256, 8 of 512
    assert sum(len(v) for v in select_rank(scores).values()) == 75  # min_per_layer=1 changes nothing here
    for name, s in scores.items():
        k = len(s) // 64
        assert chosen[name] == sorted(torch.argsort(s)[:k].tolist())


def test_rank_rule_narrow_layers_and_ties():
    scores = {"a": torch.tensor([0.5, 0.25, 0.25, 0.9]), "b": torch.ones(16)}
    assert select_rank(scores, min_per_layer=0) == {"a": [], "b": []}  # C/64 < 1: the paper prunes nothing
    chosen = select_rank(scores)
    assert chosen["a"] == [1]  # a tie at 0.25: the lower channel index wins, deterministically
    assert chosen["b"] == [0]
    assert select_rank({"c": torch.zeros(1)}) == {"c": []}  # never the only map of a layer
    with pytest.raises(MapPruneError):
        select_rank(scores, fraction=1.5)


def test_outlier_rules_flag_only_low_outliers():
    g = torch.Generator().manual_seed(0)
    s = 0.8 + 0.03 * torch.randn(64, generator=g)
    s[5], s[40] = 0.1, 0.2  # two backdoor-like maps
    s[7] = 1.0  # a high outlier: robust maps are not suspicious
    for method in ("elliptic", "mad"):
        chosen = select_outlier({"l": s}, method=method)["l"]
        assert 5 in chosen and 40 in chosen, method
        assert 7 not in chosen, method
    assert select_outlier({"l": torch.full((32,), 0.5)}, method="elliptic") == {"l": []}
    assert select_outlier({"l": torch.full((32,), 0.5)}, method="mad") == {"l": []}
    with pytest.raises(MapPruneError, match="selection rule"):
        select("magic", {"l": s})
    with pytest.raises(MapPruneError, match="outlier method"):
        select_outlier({"l": s}, method="kmeans")


def _sgd_step(model, shape):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    model(torch.rand(8, *shape)).logsumexp(1).mean().backward()
    opt.step()


def test_prune_zeroes_filter_and_gamma():
    torch.manual_seed(0)
    model = create_model("vgg16_bn", 10, width=4)
    pruned = {"net.features.0": [1, 3], "net.features.7": [0]}
    prune(model, pruned, torch.rand(1, 3, 32, 32))
    conv, bn = model.net.features[0], model.net.features[1]
    assert conv.weight[[1, 3]].abs().sum() == 0 and bn.weight[[1, 3]].abs().sum() == 0
    assert conv.weight[0].abs().sum() > 0 and bn.weight[0] != 0
    assert model.net.features[7].weight[0].abs().sum() == 0
    # With filter and gamma both zero, a conv -> BN pair gets no gradient: it cannot regrow, mask or not.
    _sgd_step(model, (3, 32, 32))
    assert conv.weight[[1, 3]].abs().sum() == 0 and bn.weight[[1, 3]].abs().sum() == 0


def test_residual_convs_regrow_unless_masked():
    torch.manual_seed(0)
    model = create_model("preactresnet18", 10, width=8)
    conv = model.net.layer1[0].conv2
    mask = prune(model, {"net.layer1.0.conv2": [2]}, torch.rand(1, 3, 32, 32))
    assert conv.weight[2].abs().sum() == 0
    _sgd_step(model, (3, 32, 32))  # conv2 feeds the residual sum: its gradient does not pass a zeroed gamma
    assert conv.weight[2].abs().sum() > 0
    mask(model)
    assert conv.weight[2].abs().sum() == 0


def _digits_backdoor(tmp_path_factory):
    from mapprune.jobs.attack import attack_run
    from mapprune.runs import load_run

    out = tmp_path_factory.mktemp("fmt") / "run"
    attack_run("badnets", out, dataset="digits", preset="demo", progress=False)
    return load_run(out)


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    return _digits_backdoor(tmp_path_factory)


def test_fmt_and_ft_on_a_really_backdoored_model(digits_run):
    from mapprune.data import clean_subset
    from mapprune.metrics import evaluate

    r = digits_run
    tests = r.test_sets()
    before = evaluate(r.model, tests)
    assert before["asr"] > 0.9 and before["acc"] > 0.9
    idx = clean_subset(r.dataset.y_train, 0.1, 0)
    x, y = r.dataset.x_train[idx], r.dataset.y_train[idx]
    original = {k: v.clone() for k, v in r.model.state_dict().items()}

    # The demo's settings for 8x8 digits (see mapprune/jobs/demo.py).
    fmt = FMT(hflip=False, batch_size=32, mask=True, fraction=1 / 8)
    result = fmt.repair(r.model, x, y)
    after = evaluate(result.model, tests)
    assert all(torch.equal(v, r.model.state_dict()[k]) for k, v in original.items()), "input model untouched"
    assert set(result.scores) == set(conv_layers(r.model))
    assert result.num_pruned == sum(max(1, math.floor(len(s) / 8)) for s in result.scores.values())
    for name, channels in result.pruned.items():  # the mask kept every pruned filter at exactly zero
        conv = dict(result.model.named_modules())[name]
        assert conv.weight[channels].abs().sum() == 0
    assert set(result.timings) >= {"test", "select", "prune", "finetune", "total"}
    assert after["acc"] > before["acc"] - 0.05
    assert after["asr"] < before["asr"] - 0.3, (before, after)

    detect = FMT(hflip=False, detect_only=True).repair(r.model, x, y)
    assert detect.num_pruned > 0 and detect.history == []
    assert all(torch.equal(v, detect.model.state_dict()[k]) for k, v in original.items())

    ft = create_defense("ft", hflip=False, batch_size=32).repair(r.model, x, y)
    assert isinstance(ft, type(result)) and ft.pruned == {} and len(ft.history) == 15  # the recommended recipe
    kd = create_defense("ft", hflip=False, batch_size=32, epochs=3, distill=1.0).repair(r.model, x, y)
    assert len(kd.history) == 3 and kd.history[0]["loss"] != ft.history[0]["loss"]  # the KL term is in the loss
    paper = create_defense("ft", recipe="paper", hflip=False, epochs=2)
    assert (paper.lr, paper.schedule, paper.batch_size, paper.epochs) == (0.01, "cosine", 256, 2)


def test_recipes_and_bad_options_fail_before_work():
    paper, rec = FMT(recipe="paper"), FMT()
    assert (paper.mask, paper.selection, paper.lr, paper.epochs) == (False, "rank", 0.01, 10)
    assert rec.mask is True and rec.recipe == "recommended" and rec.schedule == "onecycle"
    assert (rec.field_images, paper.field_images) == (16, 0)
    assert FMT(recipe="paper", mask=True).mask is True  # an explicit value wins over the recipe
    assert FMT(recipe="paper", eps=0.1).eps == 0.1 and FMT(objective="warp", eps=1.0).eps == 1.0
    assert FMT(**FMT().params()).params() == FMT().params()  # the recorded eps rebuilds the defense
    # the durable recipe is the recommended one without the distillation, at twice the learning rate
    durable = FMT(recipe="durable").params()
    assert (durable["distill"], durable["lr"], durable["recipe"]) == (0.0, 0.02, "durable")
    assert {k: v for k, v in durable.items() if k not in ("distill", "lr", "recipe")} == \
        {k: v for k, v in rec.params().items() if k not in ("distill", "lr", "recipe")}
    assert create_defense("ft", recipe="durable").distill == 0.0
    with pytest.raises(MapPruneError, match="scorer"):
        create_defense("fmt", scorer="x")
    for kw, msg in [({"recipe": "best"}, "recipe"), ({"objective": "x"}, "objective"),
                    ({"n_images": 0}, "n_images"), ({"eps": -1.0}, "eps"),
                    ({"eps": 0.1}, "patch objective .* has no step size"), ({"budget": -1}, "budget"),
                    ({"lr": 0.0}, "learning rate"), ({"fraction": 2.0}, "fraction"), ({"epochs": -1}, "epochs"),
                    ({"distill": -1.0}, "distill"), ({"field_images": -1}, "field_images"),
                    ({"field_images": 2.5}, "field_images"), ({"field_images": True}, "field_images")]:
        with pytest.raises(MapPruneError, match=msg):
            FMT(**kw)


def test_global_selection_ranks_within_layer_z():
    g = torch.Generator().manual_seed(0)
    scores = {"wide": 0.5 + 0.01 * torch.randn(64, generator=g), "noisy": 0.5 + 0.2 * torch.randn(16, generator=g)}
    scores["wide"][9] = 0.3  # 20 of its layer's spreads below the median: the most anomalous map anywhere
    chosen = select("global", scores, budget=1)
    assert chosen == {"wide": [9], "noisy": []}
    assert sum(len(v) for v in select("global", scores, budget=5).values()) == 5
    # Only maps below their layer's median: never a whole layer, and nothing where every map scored alike (the
    # SSBA model at seed 1, whose tied scores once had the whole first conv pruned in layer order).
    assert select("global", {"one": torch.tensor([0.1, 0.5, 0.9])}, budget=5) == {"one": [0]}
    tied = {"conv1": torch.full((16,), 1 / 32), "layer1": torch.full((16,), 1 / 32)}
    assert select("global", tied, budget=25) == {"conv1": [], "layer1": []}


def test_defense_input_errors(digits_run):
    model = digits_run.model
    with pytest.raises(MapPruneError, match="labels"):
        FineTune(epochs=0).repair(model, torch.zeros(4, 1, 8, 8, dtype=torch.uint8), torch.zeros(3))
    with pytest.raises(MapPruneError, match=r"\[0, 1\]"):
        FineTune(epochs=0).repair(model, torch.full((4, 1, 8, 8), 3.0), torch.zeros(4))
    with pytest.raises(MapPruneError, match="selection"):
        FMT(selection="all")
    with pytest.raises(MapPruneError, match="valid defenses"):
        create_defense("magic")


def test_library_example_from_readme(tmp_path, monkeypatch):
    """Runs the README's library example as written, with a model class and files of the user's own."""
    from pathlib import Path

    from mapprune.cli import __file__ as cli_file

    readme = (Path(cli_file).resolve().parents[1] / "README.md").read_text()
    blocks = [b.split("```", 1)[0] for b in readme.split("```python\n")[1:]]
    (code,) = [b for b in blocks if "FMT().repair" in b]

    class MyNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
            self.head = nn.Linear(8 * 64, 10)

        def forward(self, x):
            return self.head(self.features(x).flatten(1))

    torch.manual_seed(0)
    torch.save(MyNet().state_dict(), tmp_path / "weights.pt")
    torch.save(torch.randint(0, 256, (40, 1, 8, 8), dtype=torch.uint8), tmp_path / "clean_images.pt")
    torch.save(torch.randint(0, 10, (40,)), tmp_path / "clean_labels.pt")
    monkeypatch.chdir(tmp_path)
    scope = {"MyNet": MyNet}
    exec(compile(code, "README.md", "exec"), scope)
    result, model = scope["result"], scope["model"]
    assert result.num_pruned == 1 and list(result.pruned) == ["features.0"]
    assert result.scores["features.0"].shape == (8,)
    assert scope["repaired"] is not model and len(result.history) == 15  # the recommended fine-tune


def test_the_durable_recipe_is_the_recommended_repair_without_distillation_at_lr_0_02(digits_run):
    """What docs/fmt.md measured as the durable recipe (the recommended one with ``--distill 0 --lr 0.02``) is the
    same repair, to the bit, as ``--recipe durable``; and it is not the recommended repair."""
    from mapprune.data import clean_subset

    r = digits_run
    idx = clean_subset(r.dataset.y_train, 0.1, 0)
    x, y = r.dataset.x_train[idx], r.dataset.y_train[idx]
    kw = {"hflip": False, "batch_size": 32, "fraction": 1 / 8, "epochs": 3}
    durable = FMT(recipe="durable", **kw).repair(r.model, x, y).model.state_dict()
    spelled = FMT(distill=0.0, lr=0.02, **kw).repair(r.model, x, y).model.state_dict()
    recommended = FMT(**kw).repair(r.model, x, y).model.state_dict()
    assert all(torch.equal(v, spelled[k]) for k, v in durable.items())
    assert not all(torch.equal(v, recommended[k]) for k, v in durable.items())


def test_the_gate_repairs_a_backdoored_model_as_without_it_and_only_fine_tunes_a_clean_one(digits_run, tmp_path):
    """``gate``: on the planted BadNets the patch probe's pull fires, and the repair is the ungated one to the bit;
    on a model never poisoned no sign fires, nothing is pruned or unlearned, and the fine-tune alone keeps its clean
    accuracy where the ungated repair gives some up."""
    from mapprune.data import clean_subset
    from mapprune.jobs.attack import attack_run
    from mapprune.metrics import evaluate
    from mapprune.runs import load_run

    kw = {"hflip": False, "batch_size": 32, "fraction": 1 / 8, "epochs": 3}

    def both(r):
        idx = clean_subset(r.dataset.y_train, 0.1, 0)
        x, y = r.dataset.x_train[idx], r.dataset.y_train[idx]
        return FMT(gate=True, **kw).repair(r.model, x, y), FMT(**kw).repair(r.model, x, y)

    gated, plain = both(digits_run)
    assert gated.extra["gate"]["open"] and "patch_pull" in gated.extra["gate"]["signs"]
    assert gated.pruned == plain.pruned and gated.num_pruned > 0
    assert all(torch.equal(v, plain.model.state_dict()[k]) for k, v in gated.model.state_dict().items())
    assert evaluate(gated.model, digits_run.test_sets())["asr"] < 0.1

    attack_run("badnets", tmp_path / "clean", dataset="digits", preset="demo", poison_ratio=0.0, progress=False)
    clean = load_run(tmp_path / "clean")
    gated, plain = both(clean)
    assert gated.extra["gate"] == {**gated.extra["gate"], "open": False, "signs": [], "rejected_classes": []}
    assert gated.num_pruned == 0 and "unlearning" not in gated.extra and plain.num_pruned > 0
    before, after, ungated = (evaluate(m, clean.test_sets())["acc"] for m in (clean.model, gated.model, plain.model))
    assert after >= before - 0.01 and after > ungated, (before, after, ungated)
    with pytest.raises(MapPruneError, match="gate reads the stimulation test"):
        FMT(gate=True, stimulate=0.0)


def test_recommended_recipe_spares_a_clean_model(tmp_path):
    """On a model that was never poisoned, the recommended recipe (with the demo's digits settings) costs at most
    two points of clean accuracy, and the suspected-target anomaly stays below the backdoored model's."""
    from mapprune.jobs.attack import attack_run
    from mapprune.jobs.defend import defend_run

    clean, bad = tmp_path / "clean", tmp_path / "bad"
    attack_run("badnets", clean, dataset="digits", preset="demo", poison_ratio=0.0, progress=False)
    attack_run("badnets", bad, dataset="digits", preset="demo", progress=False)
    kw = {"fraction": 1 / 8, "batch_size": 32, "distill": 0.0, "unlearn_each": False,  # the demo's digits settings
          "progress": False}
    c = defend_run(clean, "fmt", **kw)
    b = defend_run(bad, "fmt", **kw)
    assert c["after"]["acc"] >= c["before"]["acc"] - 0.02, c["after"]
    assert b["after"]["asr"] <= 0.05 and b["before"]["asr"] > 0.9
    assert c["recipe"] == b["recipe"] == "recommended"
    assert c["suspected_target"]["anomaly_index"] < b["suspected_target"]["anomaly_index"], (
        c["suspected_target"], b["suspected_target"])


def test_unlearning_stamps_candidates_found_where_the_trigger_is(digits_run):
    """FMT's candidate triggers on the digits BadNets model sit on or next to the trigger (the bottom-right pixel;
    a 1-pixel candidate beside it excites the same 3x3 convolutions), the fine-tune stamps them on about ``unlearn``
    of each batch, and the backdoor is removed."""
    from mapprune.data import clean_subset
    from mapprune.metrics import evaluate
    from mapprune.probes import CandidateSet, Patches, Warps

    r = digits_run
    idx = clean_subset(r.dataset.y_train, 0.1, 0)
    x, y = r.dataset.x_train[idx], r.dataset.y_train[idx]
    kw = {"hflip": False, "batch_size": 32, "fraction": 1 / 8, "distill": 0.0}
    result = FMT(unlearn=0.3, **kw).repair(r.model, x, y)
    positions = result.extra["unlearning"]["patch_positions"]
    # (measured: at least 4 of 8 exactly on it on an AVX-512 CPU, 3 on an AVX2 one with 3 more at [6, 7]; at random 0.5
    # of 8 would fall within a pixel of the corner)
    assert len(positions) == 8 and [7, 7] in positions, positions
    assert sum(max(abs(r - 7), abs(c - 7)) <= 1 for r, c in positions) >= 6, positions
    assert evaluate(result.model, r.test_sets())["asr"] <= 0.05

    fmt = FMT(unlearn=0.5, **kw)
    patches = Patches(torch.tensor([[7, 7]]), torch.ones(1, 1, 1, 1))
    transform = fmt.unlearning(patches)
    xb = torch.zeros(400, 1, 8, 8)
    yb = torch.arange(400) % 10
    out, labels = transform(xb, yb, torch.Generator().manual_seed(0))
    stamped = out[:, 0, 7, 7] == 1
    assert torch.equal(labels, yb) and 150 < int(stamped.sum()) < 250  # true labels kept, about half stamped
    assert out[:, :, :7].abs().sum() == 0 and out[:, :, :, :7].abs().sum() == 0  # only the patch changed
    both = CandidateSet([patches, Warps(torch.ones(1, 2, 4, 4), 1.0)])
    mixed = both.stamp(torch.rand(6, 1, 8, 8), torch.tensor([0, 1, 0, 1, 0, 1]))
    assert (mixed[0::2, 0, 7, 7] == 1).all() and len(both) == 2
    with pytest.raises(MapPruneError, match="unlearn"):
        FMT(unlearn=1.0)
    with pytest.raises(MapPruneError, match="patch or warp"):
        FMT(unlearn=0.2, objective="mse")
    with pytest.raises(MapPruneError, match="warp_px"):
        FMT(warp_px=-1.0)


def test_adaptive_budget_prunes_the_most_that_keep_held_out_accuracy(digits_run):
    """budget='auto': every candidate up to the chosen one keeps the held-out accuracy within max_drop of the
    unpruned model's, the next one tried (if any) does not, and the pruned count is the chosen candidate."""
    from mapprune.data import clean_subset

    r = digits_run
    idx = clean_subset(r.dataset.y_train, 0.3, 0)
    x, y = r.dataset.x_train[idx], r.dataset.y_train[idx]
    for drop in (0.02, 0.2):
        result = FMT(budget="auto", max_drop=drop, hflip=False, batch_size=32, fraction=1 / 8, epochs=0,
                     warp_px=0.0).repair(r.model, x, y)
        sweep = result.extra["budget_sweep"]
        acc0 = sweep[0][1]
        kept = [k for k, a in sweep[1:] if a >= (1 - drop) * acc0]
        assert kept == [k for k, _ in sweep[1:len(kept) + 1]], "the sweep stops at the first candidate that fails"
        assert result.num_pruned == (kept[-1] if kept else 0)
        if len(kept) < len(sweep) - 1:
            assert sweep[len(kept) + 1][1] < (1 - drop) * acc0
    with pytest.raises(MapPruneError, match="global"):
        FMT(budget="auto", selection="rank")
    with pytest.raises(MapPruneError, match="held-out"):
        FMT(budget="auto", held_out=0.0)
    with pytest.raises(MapPruneError, match="budget"):
        FMT(budget="many")


def test_bf16_and_fp32_testing_select_nearly_the_same_maps(digits_run):
    """bf16 moves per-map scores a little, so maps at the selection's edge may swap: on an AVX-512 CPU (native bf16)
    the selections were equal, on an AVX2 one 22 of fp32's 24 maps were kept. The suspected target is the same."""
    from mapprune.data import clean_subset

    r = digits_run
    idx = clean_subset(r.dataset.y_train, 0.1, 0)
    x, y = r.dataset.x_train[idx], r.dataset.y_train[idx]
    kw = {"hflip": False, "fraction": 1 / 8, "detect_only": True, "warp_px": 0.0}
    fp32 = FMT(precision="fp32", **kw).repair(r.model, x, y)
    bf16 = FMT(precision="bf16", **kw).repair(r.model, x, y)
    assert bf16.pruned.keys() == fp32.pruned.keys()
    kept = sum(len(set(fp32.pruned[k]) & set(bf16.pruned[k])) for k in fp32.pruned)
    assert kept >= 0.8 * sum(map(len, fp32.pruned.values())), (fp32.pruned, bf16.pruned)
    assert bf16.extra["suspected_target"]["target"] == fp32.extra["suspected_target"]["target"] == 0
    with pytest.raises(MapPruneError, match="precision"):
        FMT(precision="fp8")


def test_random_candidates_control_keeps_counts_and_sizes():
    from mapprune.defenses.fmt import random_candidates
    from mapprune.probes import CandidateSet, Patches, Warps

    found = CandidateSet([Patches(torch.tensor([[0, 0], [3, 3]]), torch.ones(2, 3, 5, 5)), Warps(torch.zeros(3, 2, 4, 4), 1.0)])
    rand = random_candidates(found, (32, 32), seed=0)
    patches, warps = rand.parts
    assert len(rand) == 5 and patches.window.shape == (2, 3, 5, 5) and warps.phi.shape == (3, 2, 4, 4)
    assert int(patches.pos.min()) >= 0 and int(patches.pos.max()) <= 27 and warps.pixels == 1.0
    assert set(patches.window.unique().tolist()) <= {0.0, 1.0} and set(warps.phi.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(random_candidates(found, (32, 32), seed=0).parts[0].pos, patches.pos)  # seeded
    with pytest.raises(MapPruneError, match="unlearn_candidates"):
        create_defense("fmt", unlearn_candidates="oracle")


def test_unlearn_each_gives_every_candidate_family_its_own_share():
    """``unlearn_each`` (the recommended recipe's): every family is stamped on its own share. Split: one share of
    the batch, divided among the families, so a third family thins out the other two."""
    from mapprune.probes import CandidateSet, Patches

    def family(value, row):  # a family of 2 patches of one colour, in its own rows of the image
        return Patches(torch.tensor([[row, 0], [row, 4]]), torch.full((2, 3, 2, 2), value))

    three = CandidateSet([family(1.0, 0), family(0.5, 4), family(0.25, 8)])
    x, y = torch.zeros(4000, 3, 12, 12), torch.zeros(4000, dtype=torch.long)

    def shares(fmt):
        out, _ = fmt.unlearning(three)(x, y, torch.Generator().manual_seed(0))
        return [float((out[:, 0, row:row + 2] == v).flatten(1).any(1).float().mean())
                for v, row in ((1.0, 0), (0.5, 4), (0.25, 8))]

    split, each = shares(FMT(unlearn=0.3, unlearn_each=False)), shares(FMT(unlearn=0.3))
    assert all(abs(s - 0.1) < 0.02 for s in split) and all(abs(s - 0.3) < 0.03 for s in each)
    assert FMT.variant_name({"unlearn_each": False}) == "fmt-nounlearneach" and FMT.variant_name({}) == "fmt"
    assert FMT(recipe="paper").unlearn_each is False
    with pytest.raises(MapPruneError, match="unlearn_each"):
        FMT(unlearn_each="yes")


def test_a_result_saved_before_an_option_existed_matches_only_its_legacy_value(tmp_path):
    import json

    from mapprune.jobs.defend import find_result

    params = FMT(unlearn_each=False, field_images=0).params()
    # saved before unlearn_each (and the stimulation test, and field_images) existed
    old = {k: v for k, v in params.items() if k not in ("unlearn_each", "stimulate", "stimulate_images",
                                                        "field_images")}
    folder = tmp_path / "defense" / "fmt"
    folder.mkdir(parents=True)
    (folder / "result.json").write_text(json.dumps({"defense": "fmt", "params": old,
                                                    "clean_subset": {"ratio": 0.1, "seed": 0}}))
    assert find_result(tmp_path, "fmt", params, 0.1, 0) == folder  # it did what unlearn_each=False does
    # it judged the candidate fields on every test image, not on the recommended recipe's 16
    assert find_result(tmp_path, "fmt", FMT(unlearn_each=False).params(), 0.1, 0) is None
    assert find_result(tmp_path, "fmt", FMT().params(), 0.1, 0) is None  # the recommended recipe's unlearn_each
    assert find_result(tmp_path, "fmt", FMT(unlearn_each=False, smooth_linf=0.0).params(), 0.1, 0) is None
    assert find_result(tmp_path, "fmt", params, 0.1, 1) is None
    # The stimulation test only changes what is reported: a result made without it (or before it existed, or at
    # another level) stands for the same repair at any level.
    assert FMT(unlearn_each=False, field_images=0).stimulate == 4.0 and "stimulate" not in old
    assert find_result(tmp_path, "fmt", FMT(unlearn_each=False, field_images=0, stimulate=0,
                                            stimulate_images=10).params(), 0.1, 0) == folder


def test_smooth_probe_finds_a_low_frequency_backdoors_target(tmp_path):
    """Low Frequency's trigger is a faint additive change of every pixel: the recommended recipe's smooth-field
    probe suspects its target (the patch probe does not), unlearns those fields, and the backdoor is gone."""
    from mapprune.data import clean_subset
    from mapprune.jobs.attack import attack_run
    from mapprune.metrics import evaluate
    from mapprune.runs import load_run

    out = tmp_path / "lf"
    attack_run("lowfreq", out, dataset="digits", preset="demo", progress=False, target=1,
               attack_kw={"eps": 0.2, "surrogate": "smallcnn", "surrogate_width": 16, "surrogate_epochs": 2})
    r = load_run(out)
    assert evaluate(r.model, r.test_sets())["asr"] > 0.8
    idx = clean_subset(r.dataset.y_train, 0.1, 0)
    result = FMT(hflip=False, batch_size=32, fraction=1 / 8, distill=0.0).repair(r.model, r.dataset.x_train[idx],
                                                                                 r.dataset.y_train[idx])
    unlearning = result.extra["unlearning"]
    assert unlearning["smooth_size"] == 0.06 and len(unlearning["smooth_maps"]) == 8
    assert unlearning["smooth_suspected_target"]["target"] == 1 and result.extra["suspected_target"]["target"] != 1
    after = evaluate(result.model, r.test_sets())
    assert after["asr"] <= 0.05 and after["acc"] >= 0.93
    with pytest.raises(MapPruneError, match="smooth_linf"):
        FMT(smooth_linf=1.5)


def test_unlearn_append_adds_stamped_copies_and_keeps_every_clean_image():
    """``unlearn_append``: each family's stamped images are copies added after the batch (the same draws as
    replacing), so the batch's clean images all stay; the teacher of the distillation sees each copy's source."""
    from mapprune.defenses.base import FineTuning
    from mapprune.defenses.stamping import stamping_each
    from mapprune.probes import CandidateSet, Patches

    def family(value, row):
        return Patches(torch.tensor([[row, 0], [row, 4]]), torch.full((2, 3, 2, 2), value))

    two = CandidateSet([family(1.0, 0), family(0.5, 4)])
    x, y = torch.rand(2000, 3, 12, 12) * 0.1, torch.randint(0, 10, (2000,))
    out, labels, src = stamping_each(two.parts, 0.3, True)(x, y, torch.Generator().manual_seed(0))
    assert torch.equal(out[:2000], x) and torch.equal(labels, y[src]) and torch.equal(src[:2000], torch.arange(2000))
    copies = out[2000:]
    ones = (copies[:, 0, 0:2] == 1.0).flatten(1).any(1)
    halves = (copies[:, 0, 4:6] == 0.5).flatten(1).any(1)
    assert bool((ones ^ halves).all())  # every copy carries exactly one family's candidate
    assert abs(float(ones.sum()) / 2000 - 0.3) < 0.03 and abs(float(halves.sum()) / 2000 - 0.3) < 0.03
    replaced, _ = FMT(unlearn=0.3).unlearning(two)(x, y, torch.Generator().manual_seed(0))
    hit = (replaced[:, 0, 0:2] == 1.0).flatten(1).any(1).nonzero().flatten()
    assert torch.equal(hit, src[2000:][ones])  # the same images drawn as when replacing
    assert FMT.variant_name({"unlearn_append": True}) == "fmt-unlearnappend"
    with pytest.raises(MapPruneError, match="unlearn_append"):
        create_defense("fmt", unlearn_append=True)

    seen = []

    class Teacher(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, xb):
            seen.append(xb.shape[0])
            return self.model(xb)

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 12 * 12, 10))
    ft = FineTuning(epochs=1, batch_size=50, distill=1.0, relearn_lr=0)  # the teacher only sees training batches
    history = ft.finetune(model, (x[:200] * 255).to(torch.uint8), y[:200], teacher=Teacher(copy.deepcopy(model)),
                          transform=stamping_each(two.parts, 0.3, True))
    assert len(seen) == 4 and all(n > 50 for n in seen) and 0 <= history[0]["train_acc"] <= 1
