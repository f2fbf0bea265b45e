"""The ground-truth diagnostic: causal effects, pruning curves, scorer metrics, and the CLI, on a model with a
really planted backdoor (BadNets on the 8x8 digits)."""

import json

import pytest
import torch

from mapprune.errors import MapPruneError
from mapprune.jobs.diagnose import (
    SingleMapPruner,
    auroc,
    causal_effect,
    diagnose,
    flat_index,
    pruning_curve,
    spearman,
)
from mapprune.models import create_model
from mapprune.probes import conv_layers, estimate_target, probe_feature_maps, robust_z, suspicion


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    from mapprune.jobs.attack import attack_run
    from mapprune.runs import load_run

    out = tmp_path_factory.mktemp("diag") / "run"
    attack_run("badnets", out, dataset="digits", preset="demo", progress=False)
    return out, load_run(out)


def test_auroc_and_spearman():
    assert auroc(torch.tensor([0.1, 0.2, 0.9, 0.8]), torch.tensor([0, 0, 1, 1])) == 1.0
    assert auroc(torch.tensor([0.9, 0.8, 0.1, 0.2]), torch.tensor([0, 0, 1, 1])) == 0.0
    assert auroc(torch.ones(4), torch.tensor([0, 1, 0, 1])) == 0.5  # ties count one half
    assert auroc(torch.rand(4), torch.zeros(4)) is None
    assert spearman(torch.tensor([1.0, 2, 3]), torch.tensor([10.0, 20, 30])) == pytest.approx(1.0)
    assert spearman(torch.tensor([1.0, 2, 3]), torch.tensor([3.0, 2, 1])) == pytest.approx(-1.0)


def test_robust_z():
    s = torch.tensor([1.0, 1.1, 0.9, 1.0, 5.0])
    z = robust_z(s)
    assert z.argmax() == 4 and z[4] > 10
    assert torch.equal(robust_z(torch.ones(5)), torch.zeros(5, dtype=torch.float64))


def test_single_map_pruner_restores_exactly():
    torch.manual_seed(0)
    model = create_model("preactresnet18", 10, width=8).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruner = SingleMapPruner(model, torch.rand(1, 3, 32, 32))
    saved = pruner.ablate("net.layer1.0.conv1", 3)
    assert model.net.layer1[0].conv1.weight[3].abs().sum() == 0
    assert model.net.layer1[0].bn2.weight[3] == 0  # the BN that normalises this conv, as FMT prunes
    pruner.restore(saved)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_ground_truth_finds_the_backdoor(digits_run):
    _, r = digits_run
    model = r.model.eval()
    d = r.dataset
    keep = torch.nonzero(d.y_test != r.attack.target).flatten()[:150]
    xt = r.attack.apply(d.x_test[keep])
    yt = r.attack.target_labels(d.y_test[keep])
    xc, yc = d.x_test[:150], d.y_test[:150]
    effect = causal_effect(model, xc, yc, xt, yt)
    assert list(effect) == list(conv_layers(model))
    d_asr = torch.cat([e[:, 0] for e in effect.values()])
    assert d_asr.max() > 0.05, "some single map carries part of a planted backdoor"
    index = flat_index({n: m.out_channels for n, m in conv_layers(model).items()})
    oracle = torch.argsort(-d_asr, stable=True).tolist()
    rand = torch.randperm(len(index), generator=torch.Generator().manual_seed(0)).tolist()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    by_oracle = pruning_curve(model, index, oracle, [0, 8], xc, yc, xt, yt)
    by_random = pruning_curve(model, index, rand, [0, 8], xc, yc, xt, yt)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items()), "curves leave the model as it was"
    assert by_oracle[0] == by_random[0]  # k = 0: the model itself
    assert by_oracle[1]["asr"] < by_random[1]["asr"] - 0.1


def _synthetic_test(n_maps=60, n=40, k=5, target=2, backdoor_maps=(7, 33)):
    """A MapTest where every map pulls a little towards a sink class (4) and two maps pull hard to ``target``."""
    from mapprune.probes import MapTest

    y = torch.arange(n) % k
    base = torch.full((n, k), 0.1)
    base[torch.arange(n), y] = 0.6
    probs = base.repeat(n_maps, 1, 1)
    probs[:, :, 4] += 0.1  # the sink: every map
    for m in backdoor_maps:
        probs[m, :, target] += 0.5
    probs = probs / probs.sum(-1, keepdim=True)
    return MapTest({"a": torch.rand(30), "b": torch.rand(n_maps - 30)}, y, {"a": probs[:30], "b": probs[30:]}, base)


def test_target_estimate_prefers_a_few_maps_over_a_sink():
    test = _synthetic_test()
    est = estimate_target(test)
    assert est["target"] == 2 and est["anomaly_index"] > 2, est
    s = suspicion(test, "target", 2)
    assert s["a"].argmax() == 7 and s["b"].argmax() == 3
    acc = suspicion(test, "accuracy")
    assert torch.equal(acc["a"], -test.acc["a"].double())
    with pytest.raises(MapPruneError, match="valid scorers"):
        suspicion(test, "magic")


def test_probe_keeps_probabilities(digits_run):
    _, r = digits_run
    x, y = r.dataset.x_train[:20], r.dataset.y_train[:20]
    test = probe_feature_maps(r.model, x, y, eps=0.2, keep_probs=True)
    assert list(test.probs) == list(test.acc)
    for name, p in test.probs.items():
        assert p.shape == (len(test.acc[name]), 20, 10)
        assert torch.allclose(p.sum(-1), torch.ones(p.shape[:2]), atol=1e-5)
        assert torch.equal(test.acc[name], (p.argmax(-1) == y).float().mean(1))
    assert test.null_probs.shape == (20, 10)


def test_diagnose_report_and_cli(digits_run, capsys):
    from mapprune.cli import main

    path, r = digits_run
    settings = {"paper": {"n_images": 32, "eps": 0.2}, "b64": {"n_images": 64, "balanced": True, "eps": 0.2}}
    rep = diagnose(r.model, r, settings=settings, seeds=(0, 1), n_eval=100, budget=4, ks=(0, 2, 4, 8),
                   progress=False)
    orderings = rep["orderings"]
    assert set(orderings) == {"oracle-causal", "oracle-response", "random", "paper/accuracy", "paper/target",
                              "b64/accuracy", "b64/target"}
    assert orderings["oracle-causal"]["auroc_causal"] == 1.0
    for res in orderings.values():
        assert [c["k"] for c in res["curve"]] == [0, 2, 4, 8]
        assert 0 <= res["precision@4"] <= 1
    assert len(orderings["paper/target"]["seed_spearman"]) == 1
    assert orderings["paper/accuracy"]["rank_rule"]["num_pruned"] > 0
    assert orderings["oracle-causal"]["asr@4"] <= orderings["random"]["asr@4"]

    assert main(["diagnose", str(path), "--n-eval", "60", "--budget", "3", "--no-progress",
                 "--setting", "p:n_images=16,eps=0.2"]) == 0
    out = capsys.readouterr().out
    assert "oracle-causal" in out and "p/target" in out
    saved = json.loads((path / "diagnose" / "model" / "diagnose.json").read_text())
    assert saved["budget"] == 3 and (path / "diagnose" / "model" / "curves.png").is_file()


@pytest.mark.parametrize(("argv", "expected"), [
    (["--setting", "nocolon"], "NAME:KEY=VALUE"),
    (["--setting", "a:steps=3"], "unknown key 'steps'"),
    (["--setting", "a:objective=up"], "objective must be one of"),
    (["--n-eval", "0"], "--n-eval"),
])
def test_diagnose_cli_rejects_bad_options(digits_run, capsys, argv, expected):
    from mapprune.cli import main

    path, _ = digits_run
    assert main(["diagnose", str(path), *argv]) == 2
    assert expected in capsys.readouterr().err
