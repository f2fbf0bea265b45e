"""The defense protocol, for every registered defense: options, variant names, the fit / held-out split, the leak
firewall (no defense can reach the test sets or the trigger), and the contract each defense keeps."""

import json

import pytest
import torch

from mapprune.defenses import DEFENSES, create_defense, defense_class
from mapprune.defenses.base import split_clean
from mapprune.errors import MapPruneError

# Settings that make each defense cheap on the 8x8 digits model (a new defense gets an entry here).
FAST = {
    "fmt": {"batch_size": 32, "epochs": 1, "fraction": 1 / 8},
    "ft": {"batch_size": 32, "epochs": 1},
    "fp": {"batch_size": 32, "epochs": 1},
    "clp": {},
    "anp": {"iterations": 20},
    "rnp": {"unlearn_epochs": 2, "recover_epochs": 2},
    "nad": {"teacher_epochs": 1, "epochs": 1, "batch_size": 32},
    "nc": {"reverse_epochs": 2, "n_images": 100, "epochs": 1, "batch_size": 32},
    "ibau": {"rounds": 1, "batch_size": 32},
    "sau": {"rounds": 1, "batch_size": 64},
    "fst": {"epochs": 1, "batch_size": 32},
}


def test_every_defense_has_fast_settings_here():
    assert set(FAST) == set(DEFENSES), "add the new defense's cheap settings to FAST"


@pytest.mark.parametrize("name", sorted(DEFENSES))
def test_options_come_from_the_signature_and_bad_ones_fail(name):
    cls = defense_class(name)
    opts = cls.option_names()
    assert {"held_out", "seed", "hflip"} <= set(opts) and "device" not in opts and "progress" not in opts
    d = create_defense(name, **FAST[name])
    assert set(d.params()) == set(opts), "every option is recorded, and only options"
    with pytest.raises(MapPruneError, match="no option 'nonsense'"):
        create_defense(name, nonsense=1)
    with pytest.raises(MapPruneError, match="held_out"):
        create_defense(name, held_out=1.0)
    assert cls.variant_name({}) == name
    assert cls.variant_name({"seed": 2}) == f"{name}-seed2"
    assert cls.variant_name({"held_out": 0.3}) == f"{name}-heldout0.3"


def test_variant_names_ignore_defaults_and_name_recipes():
    assert defense_class("fmt").variant_name({"recipe": "paper", "epochs": 10, "mask": True}) == "fmt-paper-mask"
    assert defense_class("anp").variant_name({"eps": 0.4, "threshold": 0.2}) == "anp-threshold0.2"
    assert defense_class("rnp").variant_name({"threshold": 0.7}) == "rnp"
    assert defense_class("fp").variant_name({"recipe": "paper"}) == "fp-paper"


def test_split_is_stratified_seeded_and_disjoint():
    y = torch.arange(10).repeat_interleave(50)
    x = torch.zeros(len(y), 1, 4, 4, dtype=torch.uint8)
    a, b = split_clean(x, y, 0.2, seed=0), split_clean(x, y, 0.2, seed=0)
    assert torch.equal(a.fit_idx, b.fit_idx) and torch.equal(a.select_idx, b.select_idx)
    assert len(a.select_idx) == 100 and len(a.fit_idx) == 400
    assert not set(a.fit_idx.tolist()) & set(a.select_idx.tolist())
    assert torch.bincount(a.select[1]).tolist() == [10] * 10  # 20% of every class
    other = split_clean(x, y, 0.2, seed=1)
    assert not torch.equal(other.select_idx, a.select_idx)
    none = split_clean(x, y, 0.0, seed=0)
    assert len(none.select_idx) == 0 and len(none.fit_idx) == len(y)
    with pytest.raises(MapPruneError, match="nothing to fit"):
        split_clean(x[::50], y[::50], 0.5, seed=0)  # one image per class: all of it would be held out


@pytest.fixture
def tripwire(monkeypatch):
    """While a defense repairs, touching the test images, the trigger or a dataset loader raises."""
    from mapprune.attacks.base import Attack
    from mapprune.data.dataset import ImageDataset
    from mapprune.defenses.base import Defense

    state = {"inside": False}

    def guard(what):
        if state["inside"]:
            raise AssertionError(f"a defense reached {what}")

    original_getattr = ImageDataset.__getattribute__

    def getattribute(self, name):
        if name in ("x_test", "y_test"):
            guard(f"the test split ({name})")
        return original_getattr(self, name)

    monkeypatch.setattr(ImageDataset, "__getattribute__", getattribute)
    for method in ("apply", "trigger", "backdoor_test", "poison_train"):
        original = getattr(Attack, method)

        def wrapped(self, *a, _m=method, _f=original, **k):
            guard(f"the attack ({_m})")
            return _f(self, *a, **k)
        monkeypatch.setattr(Attack, method, wrapped)
    import mapprune.runs as runs_module

    original_load = runs_module.load_dataset

    def load_dataset(*a, **k):
        guard("a dataset loader")
        return original_load(*a, **k)
    monkeypatch.setattr(runs_module, "load_dataset", load_dataset)
    original_repair = Defense.repair

    def repair(self, *a, **k):
        state["inside"] = True
        try:
            return original_repair(self, *a, **k)
        finally:
            state["inside"] = False
    monkeypatch.setattr(Defense, "repair", repair)
    return state


def test_the_tripwire_fires(tripwire, digits_backdoor):
    _, run = digits_backdoor
    tripwire["inside"] = True
    with pytest.raises(AssertionError, match="test split"):
        _ = run.dataset.x_test
    with pytest.raises(AssertionError, match="attack"):
        run.attack.apply(run.dataset.x_train[:2])
    tripwire["inside"] = False


@pytest.mark.parametrize("name", sorted(DEFENSES))
def test_contract(name, digits_backdoor, tripwire, tmp_path):
    """Through defend_run, behind the firewall: result.json records the parameters (and they rebuild the same
    defense), the split, per-phase timings; the run's model is untouched; uint8 and float inputs agree."""
    import shutil

    from mapprune.jobs.defend import defend_run

    folder, run = digits_backdoor
    work = tmp_path / "run"
    shutil.copytree(folder, work, ignore=shutil.ignore_patterns("defense"))
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    report = defend_run(work, name, progress=False, **FAST[name])
    saved = json.loads((work / "defense" / report["name"] / "result.json").read_text())
    assert saved["params"] == report["params"]
    rebuilt = create_defense(name, **saved["params"])
    assert json.loads(json.dumps(rebuilt.params())) == saved["params"]
    assert set(saved["split"]) == {"fit", "select"} and saved["split"]["select"]
    assert saved["timings"]["total"] > 0 and len(saved["timings"]) >= 2
    assert (work / "defense" / report["name"] / "metrics.png").is_file()
    if name != "fmt" or not FAST[name].get("detect_only"):
        assert (work / "defense" / report["name"] / "model.safetensors").is_file()

    idx = torch.tensor(report["clean_subset"]["indices"])
    x, y = run.dataset.x_train[idx], run.dataset.y_train[idx]
    d = create_defense(name, hflip=False, **FAST[name])
    as_uint8 = d.repair(run.model, x, y)
    as_float = d.repair(run.model, x.float() / 255, y)
    assert all(torch.equal(v, run.model.state_dict()[k]) for k, v in before.items()), "the input model is untouched"
    for k, v in as_uint8.model.state_dict().items():
        torch.testing.assert_close(v, as_float.model.state_dict()[k], msg=f"uint8 and float inputs differ at {k}")


# Defenses that work on BatchNorm2d channels cannot apply to the ViT (LayerNorm only): they refuse it with a clear
# error before any work. NAD cannot find a transformer's stages by itself; given layers, it runs.
INCOMPATIBLE = {"vit": {"anp": "BatchNorm2d", "rnp": "BatchNorm2d", "clp": "BatchNorm", "nad": "layers"}}
ON_ARCH = {"vit": {"nad": {"layers": ["net.blocks.1", "net.blocks.2", "net.blocks.3"]}}}


@pytest.mark.parametrize("arch", ["preactresnet18", "resnet18", "vgg16_bn", "vit"])
@pytest.mark.parametrize("name", sorted(DEFENSES))
def test_every_defense_runs_on_the_papers_architectures(name, arch):
    """Tiny width, 32x32 random images: each defense completes and its model reloads strictly into the
    architecture (no pruning re-parametrisation or plug left in the checkpoint). A defense that cannot apply to
    an architecture (``INCOMPATIBLE``) says so with a MapPruneError."""
    from mapprune.checkpoint import load_state_into
    from mapprune.models import create_model

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (80, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.arange(10).repeat(8)
    torch.manual_seed(0)
    model = create_model(arch, 10, width=4)
    cheaper = {"nc": {"n_images": 20}, "fmt": {"recipe": "paper", "n_images": 8}}  # the probes dominate otherwise
    fast = {**FAST[name], **cheaper.get(name, {})}
    if name in INCOMPATIBLE.get(arch, {}):
        with pytest.raises(MapPruneError, match=INCOMPATIBLE[arch][name]):
            create_defense(name, **fast).repair(model, x, y)
        if name not in ON_ARCH.get(arch, {}):
            return
        fast.update(ON_ARCH[arch][name])
    result = create_defense(name, **fast).repair(model, x, y)
    load_state_into(create_model(arch, 10, width=4), result.model.state_dict(), "repaired")


def test_a_fine_tune_whose_loss_climbs_is_reported_as_diverged():
    from mapprune.defenses.base import loss_divergence
    from mapprune.defenses.ft import FineTune

    # Hand-made histories: the ViT's FT on Blended (0.63 -> 7.14) diverged; a one-cycle warm-up's bump did not.
    vit = [{"loss": v} for v in (0.63, 2.35, 7.14, 6.61, 4.59)]
    assert loss_divergence(vit) == {"first_loss": 0.63, "peak_loss": 7.14, "peak_epoch": 3, "last_loss": 4.59}
    assert loss_divergence([{"loss": v} for v in (1.79, 1.46, 2.44, 1.6)]) is None  # 1.36x, the largest CNN rise
    assert loss_divergence([{"loss": v} for v in (1.6, 1.08, -0.12)]) is None  # FST's loss has a negative term
    assert loss_divergence([{"loss": 0.5}]) is None

    # A real fine-tune of a linear model: a sane lr learns quietly, lr 1.0 blows the loss up; result.json says so.
    torch.manual_seed(0)
    x = torch.randint(0, 256, (300, 3, 12, 12), dtype=torch.uint8)
    y = torch.arange(300) % 10
    for c in range(10):
        x[y == c, c % 3, : c + 1] = 255
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 12 * 12, 10))
    calm = FineTune(epochs=4, lr=0.01, batch_size=50, distill=0, relearn_lr=0).repair(model, x, y)
    assert "diverged" not in calm.extra.get("fine_tune", {})
    wild = FineTune(epochs=4, lr=1.0, batch_size=50, distill=0, relearn_lr=0).repair(model, x, y)
    d = wild.extra["fine_tune"]["diverged"]
    assert d["lr"] == 1.0 and d["peak_loss"] > 1.5 * d["first_loss"]
    assert d["peak_loss"] == max(h["loss"] for h in wild.history)
