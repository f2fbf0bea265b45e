"""SSBA and Input-aware: triggers made by networks the project trains in prepare(). Invisibility and secret
recovery (SSBA), per-input triggers and masks (Input-aware), the resource cache, the saved state, and (on the
digits) that each really plants a backdoor that reloads from the run folder.

SSBA's steganography is measured on small synthetic 16x16 colour images: 8x8 grayscale digits have 64 pixels,
too few to hide a random secret under a 0.05 budget in a test-sized run (measured with 8 bits: 66% of the bits
recovered on test images after 400 steps, 70% after 1000), although the residual still plants a backdoor there.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mapprune.attacks import _generators, create_attack, ssba
from mapprune.data import cache_dir, from_numpy, load_dataset
from mapprune.errors import MapPruneError
from mapprune.evaluation import evaluate_run
from mapprune.jobs.attack import attack_run
from mapprune.runs import attack_from_manifest

# Test-sized settings (the constructor defaults are CIFAR-sized); all seeded.
SSBA_SYNTH = {"bits": 16, "width": 16, "steps": 600, "batch_size": 32}
SSBA_DIGITS = {"bits": 8, "width": 16, "steps": 400, "batch_size": 32}  # bits not read: see the docstring
# On 8x8 images a 3% mask is two pixels; 10% gives every image a trigger it can be recognised by.
IA_DIGITS = {"mask_steps": 200, "steps": 300, "batch_size": 32, "mask_density": 0.1}


def resource_files(kind: str) -> set:
    return {p.name for p in (cache_dir() / "resources").glob(f"{kind}-*.safetensors")}


def smooth_images(n: int, size: int, seed: int) -> np.ndarray:
    """Natural-looking stand-ins: colour fields at three scales plus a little pixel noise, uint8 NCHW."""
    g = torch.Generator().manual_seed(seed)
    x = sum(F.interpolate(torch.rand(n, 3, r, r, generator=g), size=(size, size), mode="bicubic",
                          align_corners=False) for r in (2, 4, 8)) / 3
    x = (x + 0.05 * torch.randn(n, 3, size, size, generator=g)).clamp(0, 1)
    return (x * 255).round().to(torch.uint8).numpy()


@pytest.fixture(scope="module")
def synth():
    return from_numpy("synth", smooth_images(600, 16, 0), np.arange(600) % 10, smooth_images(200, 16, 1),
                      np.arange(200) % 10)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def ssba_synth(synth):
    atk = create_attack("ssba", synth.image_shape, 10, **SSBA_SYNTH)
    atk.prepare(synth, progress=False)
    return atk


def make_run(tmp_path_factory, name, kw):
    out = tmp_path_factory.mktemp(name) / "run"
    return out, attack_run(name, out, dataset="digits", preset="demo", progress=False, attack_kw=kw)


@pytest.fixture(scope="module")
def ssba_run(tmp_path_factory):
    return make_run(tmp_path_factory, "ssba", SSBA_DIGITS)


@pytest.fixture(scope="module")
def ia_run(tmp_path_factory):
    return make_run(tmp_path_factory, "inputaware", IA_DIGITS)


@pytest.fixture
def ia(ia_run, digits, monkeypatch):
    """The Input-aware attack of the run, prepared again: from the cache, never retrained."""
    atk = create_attack("inputaware", digits.image_shape, 10, **IA_DIGITS)
    with monkeypatch.context() as mp:
        mp.setattr(_generators, "train_generators", lambda *a: pytest.fail("retrained although cached"))
        atk.prepare(digits, progress=False)
    return atk


# -- SSBA -------------------------------------------------------------------------------------------------------

def test_ssba_invisible_and_secret_recovered_on_held_out_images(ssba_synth, synth):
    x = synth.x_test  # never seen by the encoder
    xp = ssba_synth.apply(x)
    assert (xp.int() - x.int()).abs().max().item() <= 13  # budget 0.05 = 12.75/255, plus rounding
    mse = (xp.float() - x.float()).div(255).pow(2).mean(dim=(1, 2, 3))
    psnr = 10 * torch.log10(1 / mse)
    assert psnr.min().item() > 27  # measured 29.0 dB (mean 31.2); the budget alone guarantees 26
    bits = ssba_synth.decode(xp.float() / 255)
    acc = (bits == ssba_synth.secret).float().mean(1)
    assert acc.mean().item() > 0.95  # measured 0.998
    assert (acc >= 0.75).all()  # measured: at worst 15 of 16 bits
    # The bits are in the residual, not in the decoder: clean images decode to about chance.
    clean = (ssba_synth.decode(x.float() / 255) == ssba_synth.secret).float().mean().item()
    assert clean < 0.75  # measured 0.50
    assert ssba_synth.train_bit_accuracy > 0.95  # measured 0.996


def test_ssba_trigger_is_sample_specific_and_deterministic(ssba_synth, synth):
    x = synth.x_test[:32].float() / 255
    r = ssba_synth.trigger(x) - x
    assert not torch.allclose(r[0], r[1], atol=1e-3)
    pair = (r[1:] - r[:-1]).abs().mean(dim=(1, 2, 3))
    assert pair.min().item() > 0.005  # measured 0.012 (mean 0.022) on residuals of mean size 0.024
    # Not one pattern for all images: the centred residuals of neighbouring images are far from parallel.
    rc = r.flatten(1) - r.flatten(1).mean(1, keepdim=True)
    assert F.cosine_similarity(rc[1:], rc[:-1]).mean().item() < 0.7  # measured 0.36 (0.96 without the term)
    assert torch.equal(ssba_synth.trigger(x), ssba_synth.trigger(x))
    # No batch statistics: an image's trigger does not depend on the rest of the batch.
    assert torch.allclose(ssba_synth.trigger(x[:3]), ssba_synth.trigger(x)[:3], atol=1e-6)


def test_ssba_cache_hit_and_key_change(ssba_synth, synth, monkeypatch):
    before = resource_files("ssba")
    monkeypatch.setattr(ssba, "train_stega", lambda *a: pytest.fail("retrained although cached"))
    again = create_attack("ssba", synth.image_shape, 10, **SSBA_SYNTH)
    again.prepare(synth, progress=False)
    assert again.resource == ssba_synth.resource
    assert torch.equal(again.apply(synth.x_test[:8]), ssba_synth.apply(synth.x_test[:8]))
    # The secret is not part of the key: another secret reuses the same encoder.
    other_secret = create_attack("ssba", synth.image_shape, 10, **SSBA_SYNTH, secret_seed=5)
    other_secret.prepare(synth, progress=False)
    assert other_secret.resource == ssba_synth.resource
    assert not torch.equal(other_secret.secret, ssba_synth.secret)
    monkeypatch.undo()
    changed = create_attack("ssba", synth.image_shape, 10, **{**SSBA_SYNTH, "steps": 3})
    changed.prepare(synth, progress=False)
    assert changed.resource != ssba_synth.resource
    assert len(resource_files("ssba") - before) == 1


def test_ssba_state_round_trip(ssba_synth, synth):
    state = ssba_synth.state()
    assert set(state) == {"secret"} | {k for k in state if k.startswith("enc.")}  # no decoder, no data
    cfg = {k: v for k, v in ssba_synth.config().items() if k not in ("name", "clean_label")}
    # The run manifest records which cached encoder made the trigger; re-created from it, the key is the same.
    assert cfg["resource"] == ssba_synth.resource and len(cfg["resource"]) == 16
    assert create_attack("ssba", synth.image_shape, 10, **cfg).cache_key(synth) == ssba_synth.cache_key(synth)
    fresh = create_attack("ssba", synth.image_shape, 10, **{**cfg, "secret_seed": 1})
    with pytest.raises(MapPruneError, match="call prepare"):
        fresh.apply(synth.x_test[:2])
    fresh.load_state(state)
    assert torch.equal(fresh.apply(synth.x_test), ssba_synth.apply(synth.x_test))
    with pytest.raises(MapPruneError, match="no secret"):
        fresh.load_state({k: v for k, v in state.items() if k != "secret"})
    with pytest.raises(MapPruneError, match="does not fit"):
        create_attack("ssba", synth.image_shape, 10, **{**cfg, "width": 8}).load_state(state)


def test_ssba_plants_a_backdoor_on_digits(ssba_run, digits):
    out, m = ssba_run
    assert m["attack"]["name"] == "ssba" and m["attack"]["bits"] == 8
    assert m["metrics"]["acc"] > 0.9  # measured 0.968
    assert m["metrics"]["asr"] > 0.5  # measured 0.788; chance (a clean model) is about 0.01
    assert evaluate_run(out) == {"run": str(out), "defense": None, **m["metrics"]}
    atk = attack_from_manifest(m, out)
    x = atk.apply(digits.x_test)
    assert (x.int() - digits.x_test.int()).abs().max().item() <= 13


@pytest.mark.parametrize(("kw", "match"), [({"budget": 0}, "budget"), ({"bits": 0}, "bits"),
                                           ({"lr": -1}, "lr > 0")])
def test_ssba_bad_settings(kw, match):
    with pytest.raises(MapPruneError, match=match):
        create_attack("ssba", (3, 32, 32), 10, **kw)


def test_ssba_prepare_checks_the_image_shape(synth):
    with pytest.raises(MapPruneError, match=r"created for images of shape \(3, 32, 32\)"):
        create_attack("ssba", (3, 32, 32), 10, steps=1).prepare(synth, progress=False)


# -- Input-aware ------------------------------------------------------------------------------------------------

def test_inputaware_triggers_differ_per_input_and_mask_in_unit_range(ia, digits):
    x = digits.x_test[:64].float() / 255
    pattern, mask = ia.trigger_parts(x)
    assert mask.shape == (64, 1, 8, 8) and pattern.shape == x.shape
    assert mask.min().item() >= 0 and mask.max().item() <= 1
    assert pattern.min().item() >= 0 and pattern.max().item() <= 1
    assert 0.02 < mask.mean().item() < 0.2  # about mask_density 0.1; measured 0.097
    assert ((mask > 0.1) & (mask < 0.9)).float().mean().item() < 0.05  # nearly binary; measured 0.005
    assert ((mask > 0.5).flatten(1).sum(1) > 0).all()  # every image gets a trigger
    trig = pattern * mask
    pairs = (trig[:, None] - trig[None]).abs().mean(dim=(2, 3, 4))[~torch.eye(64, dtype=torch.bool)]
    # Measured: 98% of the 4032 pairs differ by more than 0.01 (median 0.08); the rest are near-identical
    # masks on the black border, where a dark pattern changes nothing.
    assert (pairs > 0.01).float().mean().item() > 0.9
    assert pairs.median().item() > 0.03
    masks = mask > 0.5
    assert (masks[1:] != masks[:-1]).float().mean().item() > 0.05  # masks sit in different places; measured 0.13
    assert torch.equal(ia.trigger(x), ia.trigger(x))
    assert torch.allclose(ia.trigger(x[:3]), ia.trigger(x)[:3], atol=1e-6)


def test_inputaware_poison_train_adds_cross_trigger_images(ia, digits):
    x, y = digits.x_train, digits.y_train
    px, py, idx = ia.poison_train(x, y, seed=0)
    cross = ia.cross_indices
    assert len(idx) == round(0.1 * len(y)) and len(cross) == len(idx)  # cross_ratio 1
    assert not set(idx.tolist()) & set(cross.tolist())
    assert (py[idx] == 0).all() and torch.equal(py[cross], y[cross])  # cross images keep their labels
    assert torch.equal(px[idx], ia.apply(x[idx]))
    changed = (px[cross] != x[cross]).flatten(1).any(1)
    assert changed.float().mean().item() > 0.9
    assert not torch.equal(px[cross], ia.apply(x[cross]))  # another image's trigger, not their own
    rest = torch.ones(len(y), dtype=torch.bool)
    rest[idx] = rest[cross] = False
    assert torch.equal(px[rest], x[rest]) and torch.equal(py[rest], y[rest])
    assert torch.equal(ia.poison_train(x, y, seed=0)[0], px)  # seeded


def test_inputaware_plants_a_backdoor_on_digits(ia_run, ia, digits):
    out, m = ia_run
    assert m["attack"]["mask_density"] == 0.1 and m["attack"]["cross_ratio"] == 1.0
    assert m["metrics"]["acc"] > 0.9  # measured 0.974
    assert m["metrics"]["asr"] > 0.45  # measured 0.749 (on 8x8 images); chance is about 0.01
    assert evaluate_run(out) == {"run": str(out), "defense": None, **m["metrics"]}
    loaded = attack_from_manifest(m, out)
    assert torch.equal(loaded.apply(digits.x_test), ia.apply(digits.x_test))


def test_inputaware_cache_key_change_rebuilds(ia, digits):
    before = resource_files("inputaware")
    for kw in ({"steps": 2, "mask_steps": 2}, {"steps": 2, "mask_steps": 2, "target": 3}):
        atk = create_attack("inputaware", digits.image_shape, 10, **{**IA_DIGITS, **kw})
        atk.prepare(digits, progress=False)
        assert atk.resource != ia.resource
    assert len(resource_files("inputaware") - before) == 2  # the target is part of the key


def test_inputaware_state_round_trip(ia, digits):
    state = ia.state()
    assert state and all(k.startswith(("gen.", "mask.")) for k in state)
    cfg = {k: v for k, v in ia.config().items() if k not in ("name", "clean_label")}
    assert cfg["resource"] == ia.resource and len(cfg["resource"]) == 16
    fresh = create_attack("inputaware", digits.image_shape, 10, **cfg)
    assert fresh.cache_key(digits) == ia.cache_key(digits)
    with pytest.raises(MapPruneError, match="call prepare"):
        fresh.apply(digits.x_test[:2])
    fresh.load_state(state)
    assert torch.equal(fresh.apply(digits.x_test), ia.apply(digits.x_test))
    with pytest.raises(MapPruneError, match="no 'mask"):
        fresh.load_state({k: v for k, v in state.items() if k.startswith("gen.")})


@pytest.mark.parametrize(("kw", "match"), [({"mask_density": 0}, "mask_density"),
                                           ({"joint_attack_ratio": 0.6, "joint_cross_ratio": 0.5}, "sum below 1"),
                                           ({"joint_model": "nope"}, "unknown model 'nope'"),
                                           ({"batch_size": 1}, "batch_size >= 2")])
def test_inputaware_bad_settings(kw, match):
    with pytest.raises(MapPruneError, match=match):
        create_attack("inputaware", (3, 32, 32), 10, **kw)
