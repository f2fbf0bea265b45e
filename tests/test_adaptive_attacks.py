"""Adaptive attacks that know FMT: their regularisers change what they claim to change on a small model, at
(nearly) the same attack success, and their runs reload by name."""

import pytest
import torch

from mapprune.attacks import create_attack
from mapprune.errors import MapPruneError

PATCH2 = {"base_opts": {"patch_size": 2}}  # BadNets' default on 8x8 is one pixel, too weak a trigger to compare


def _train(tmp_path_factory, name, kw):
    from mapprune.jobs.attack import attack_run
    from mapprune.runs import load_run

    out = tmp_path_factory.mktemp(name) / "run"
    attack_run(name, out, dataset="digits", preset="demo", progress=False, attack_kw=kw)
    return load_run(out)


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    return _train(tmp_path_factory, "badnets", {"patch_size": 2})


def _largest_shift(r) -> float:
    from mapprune.jobs.diagnose import trigger_response

    x, y = r.dataset.x_test, r.dataset.y_test
    xc = x[y != r.attack.target][:200]
    return max(float(v.max()) for v in trigger_response(r.model, xc, r.attack.apply(xc)).values())


def _target_pull(r) -> tuple[float, int]:
    from mapprune.defenses.fmt import FMT
    from mapprune.probes import class_pull, estimate_target

    test = FMT(fraction=0.125).probe(r.model, r.dataset.x_train[:500], r.dataset.y_train[:500])
    return float(class_pull(test)[:, r.attack.target].max()), estimate_target(test)["target"]


def _asr(r) -> float:
    from mapprune.metrics import evaluate

    return evaluate(r.model, r.test_sets())["asr"]


def test_distributed_spreads_the_trigger_over_maps_at_equal_asr(plain, tmp_path_factory):
    spread = _train(tmp_path_factory, "distributed", PATCH2)
    assert _asr(plain) > 0.95 and _asr(spread) > 0.9 and _asr(plain) - _asr(spread) < 0.06
    assert _largest_shift(spread) < 0.7 * _largest_shift(plain)
    assert spread.attack.inner.patch_size == 2 and spread.attack.weight == 0.3  # reloaded by name


def test_fmt_evasive_hides_the_target_from_fmts_probes(plain, tmp_path_factory):
    evasive = _train(tmp_path_factory, "fmt-evasive", PATCH2)
    assert _asr(evasive) > 0.95
    pull_plain, target_plain = _target_pull(plain)
    pull_evasive, _ = _target_pull(evasive)
    assert target_plain == 0 and pull_evasive < 0.5 * pull_plain


def test_bad_adaptive_settings_are_refused():
    for kw, msg in [({"base": "lc"}, "clean-label or learns"), ({"base": "multi"}, "plain trigger"),
                    ({"weight": -1.0}, "weight"), ({"margin": -1.0}, "margin")]:
        with pytest.raises(MapPruneError, match=msg):
            create_attack("distributed", (3, 32, 32), 10, **kw)
    with pytest.raises(MapPruneError, match="maps"):
        create_attack("fmt-evasive", (3, 32, 32), 10, maps=0)
    atk = create_attack("fmt-evasive", (3, 32, 32), 10, base="blended")
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(atk.trigger(x), atk.inner.trigger(x)) and set(atk.state_names) == set(atk.inner.state_names)
