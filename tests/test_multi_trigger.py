"""Several triggers in one model: the spec is parsed with clear errors, each trigger keeps its own target and
poison draw, the metrics report ASR and RA per trigger, and a digits model really learns both backdoors."""

import pytest
import torch
from torch import nn

from mapprune.attacks import create_attack
from mapprune.attacks.multi import parse_triggers
from mapprune.errors import MapPruneError
from mapprune.metrics import evaluate


def test_trigger_specs_parse_with_options_and_bad_ones_are_named():
    assert parse_triggers("badnets:0,blended:5:alpha=0.1:pattern=noise") == [
        {"name": "badnets", "target": 0}, {"name": "blended", "target": 5, "alpha": 0.1, "pattern": "noise"}]
    assert parse_triggers([{"name": "sig", "target": 2}, "wanet:3"])[1] == {"name": "wanet", "target": 3}
    for bad, msg in [("badnets", "NAME:TARGET"), ("badnets:x,blended:1", "NAME:TARGET"), ("badnets:0", "two or more"),
                     ("badnets:0:alpha,blended:1", "KEY=VALUE")]:
        with pytest.raises(MapPruneError, match=msg):
            parse_triggers(bad)
    with pytest.raises(MapPruneError, match="trigger 2 .blended."):
        create_attack("multi", (3, 8, 8), 10, triggers="badnets:0,blended:5:size=3")
    with pytest.raises(MapPruneError, match="target label"):
        create_attack("multi", (3, 8, 8), 10, triggers="badnets:0,blended:12")


def test_each_trigger_poisons_its_own_images_with_its_own_target():
    atk = create_attack("multi", (1, 8, 8), 10, triggers="badnets:0,blended:5", poison_ratio=0.1)
    y = torch.arange(200) % 10
    x = torch.full((200, 1, 8, 8), 100, dtype=torch.uint8)
    xp, yp, idx = atk.poison_train(x, y, seed=3)
    first, second = atk.part_indices
    assert len(set(first.tolist()) & set(second.tolist())) == 0 and len(idx) == len(first) + len(second)
    assert (yp[first] == 0).all() and (yp[second] == 5).all()
    assert (y[first] != 0).all() and (y[second] != 5).all()  # all-to-one draws skip each target's own class
    untouched = torch.ones(200, dtype=torch.bool)
    untouched[idx] = False
    assert torch.equal(xp[untouched], x[untouched]) and torch.equal(yp[untouched], y[untouched])
    assert torch.equal(xp[first], atk.parts[0].apply(x[first]))
    assert torch.equal(xp[second], atk.parts[1].apply(x[second]))


class _Reads(nn.Module):
    """Predicts the class written in pixel (0, 0) of the image: hand-made predictions."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return nn.functional.one_hot((x[:, 0, 0, 0] * 255).round().long(), 10).float() + 0 * self.w


def test_metrics_per_trigger_on_hand_made_predictions():
    def images(labels):
        x = torch.zeros(len(labels), 1, 2, 2, dtype=torch.uint8)
        x[:, 0, 0, 0] = torch.tensor(labels, dtype=torch.uint8)
        return x

    # Trigger A (target 0): 3 of 4 predicted 0, 1 keeps its true label. Trigger B (target 5): 1 of 2 goes to 5.
    a = (images([0, 0, 0, 7]), torch.zeros(4, dtype=torch.long), torch.tensor([3, 4, 6, 7]))
    b = (images([5, 2]), torch.full((2,), 5), torch.tensor([1, 3]))
    sets = {"clean": (images([1, 2, 3]), torch.tensor([1, 2, 4])),
            "backdoor": tuple(torch.cat([a[j], b[j]]) for j in range(3)), "triggers": {"a->0": a, "b->5": b}}
    m = evaluate(_Reads(), sets)
    assert m["acc"] == 2 / 3 and m["asr"] == 4 / 6 and m["ra"] == 1 / 6
    assert m["triggers"] == {"a->0": {"asr": 0.75, "ra": 0.25}, "b->5": {"asr": 0.5, "ra": 0.0}}


def test_a_digits_model_learns_both_triggers_and_reloads_with_per_trigger_metrics(tmp_path):
    from mapprune.jobs.attack import attack_run
    from mapprune.runs import load_run

    out = tmp_path / "multi"
    m = attack_run("multi", out, dataset="digits", preset="demo", progress=False,
                   attack_kw={"triggers": "badnets:0,blended:5:alpha=0.3"})
    per = m["metrics"]["triggers"]
    assert set(per) == {"badnets->0", "blended->5"}
    assert per["badnets->0"]["asr"] > 0.9 and per["blended->5"]["asr"] > 0.9, per
    assert m["metrics"]["acc"] > 0.85
    run = load_run(out)
    again = evaluate(run.model, run.test_sets())
    assert again["triggers"] == per
    assert [a.target for a in run.attack.parts] == [0, 5] and run.attack.parts[1].alpha == 0.3
