"""The one registry type behind attacks, defenses, models and datasets: registering by decorator or entry point,
refusals, and an attack's params read from its signature."""

import importlib.metadata

import pytest
import torch
from torch import nn

from mapprune.attacks import ATTACKS, Attack, attack_class, create_attack, register_attack
from mapprune.data import DATASETS, from_numpy, load_dataset
from mapprune.defenses import DEFENSES, CleanData, Defense, create_defense, defense_class, register_defense
from mapprune.errors import MapPruneError
from mapprune.models import MODELS, create_model
from mapprune.registry import Registry


class _Stripe(Attack):
    name = "test-reg-stripe"

    def __init__(self, image_shape, num_classes, *, row: int = 0, colour: float = 1.0, **kw):
        super().__init__(image_shape, num_classes, **kw)
        self.row, self.colour = row, colour

    def trigger(self, x):
        x = x.clone()
        x[:, :, self.row] = self.colour
        return x


class _Noop(Defense):
    name = "test-reg-noop"

    def __init__(self, *, strength: float = 1.0, **kw):
        super().__init__(**kw)
        self.strength = strength

    def _repair(self, model, data: CleanData, device):
        return self.result(model, {"noop": 0.0})


@pytest.fixture
def plugins():
    register_attack(_Stripe)
    register_defense(_Noop)
    try:
        yield
    finally:
        ATTACKS.pop(_Stripe.name, None)
        DEFENSES.pop(_Noop.name, None)


def test_a_plugin_registered_by_decorator_is_created_by_name(plugins):
    atk = create_attack("test-reg-stripe", (3, 8, 8), 10, row=2, target=3)
    assert isinstance(atk, _Stripe) and attack_class("test-reg-stripe") is _Stripe
    assert atk.config() == {"name": "test-reg-stripe", "target": 3, "all_to_all": False, "poison_ratio": 0.1,
                            "clean_label": False, "row": 2, "colour": 1.0}
    d = create_defense("test-reg-noop", strength=2.0)
    assert isinstance(d, _Noop) and d.strength == 2.0 and defense_class("test-reg-noop") is _Noop
    with pytest.raises(MapPruneError, match="no option 'strenght'"):
        create_defense("test-reg-noop", strenght=2.0)
    assert "test-reg-stripe" in ATTACKS and "test-reg-noop" in DEFENSES.names()


def test_a_bench_grid_names_a_registered_plugin(plugins, tmp_path):
    from mapprune.bench import load_grid

    grid = tmp_path / "grid.toml"
    grid.write_text('name = "plugins"\ndataset = "digits"\npreset = "demo"\nseeds = [0]\n\n'
                    '[[attack]]\nname = "test-reg-stripe"\nopts = {row = 3}\n\n'
                    '[[defense]]\nname = "test-reg-noop"\nopts = {strength = 2.0}\n')
    g = load_grid(grid)
    assert [a["name"] for a in g.attacks] == ["test-reg-stripe"] and [d["name"] for d in g.defenses] == ["test-reg-noop"]
    grid.write_text(grid.read_text().replace("row = 3", "rows = 3"))
    with pytest.raises(MapPruneError, match="no option 'rows'"):
        load_grid(grid)


def test_duplicate_names_are_refused_in_one_line(plugins):
    other = type("Other", (Attack,), {"name": "test-reg-stripe"})
    with pytest.raises(MapPruneError, match="registered already") as e:
        register_attack(other)
    assert "\n" not in str(e.value) and "test-reg-stripe" in str(e.value)
    assert register_attack(_Stripe) is _Stripe  # the same class again is no clash
    with pytest.raises(MapPruneError, match="registered already"):
        DEFENSES.register(type("Other", (_Noop,), {"name": "ft"}))
    with pytest.raises(MapPruneError, match="registered already"):
        MODELS.register("smallcnn", lambda **kw: nn.Identity())
    with pytest.raises(MapPruneError, match="Defense subclass"):
        register_defense(_Stripe)
    with pytest.raises(MapPruneError, match="Attack subclass"):
        register_attack(int)


def test_unknown_names_list_the_valid_ones():
    for call, kind, registry in ((lambda: create_attack("nope", (3, 8, 8), 10), "attack", ATTACKS),
                                 (lambda: create_defense("nope"), "defense", DEFENSES),
                                 (lambda: create_model("nope", 10), "model", MODELS),
                                 (lambda: load_dataset("nope"), "dataset", DATASETS)):
        with pytest.raises(MapPruneError) as e:
            call()
        msg = str(e.value)
        assert msg.startswith(f"unknown {kind} 'nope'; valid {kind}s: ") and all(n in msg for n in registry)


def test_registry_reads_like_a_dict_and_registers_factories():
    reg = Registry("widget")
    reg.register("b", len)

    @reg.register("a")
    def make_a():
        return "a"

    assert list(reg) == ["b", "a"] and len(reg) == 2 and reg["a"] is make_a and reg.create("a") == "a"
    assert dict(reg.items()) == {"b": len, "a": make_a} and "a" in reg and "c" not in reg
    with pytest.raises(MapPruneError, match="unknown widget 'c'; valid widgets: a, b"):
        reg.get("c")
    with pytest.raises(MapPruneError, match="name attribute"):
        reg.register(make_a)


class _EntryPoint:
    def __init__(self, name, value, obj):
        self.name, self.value, self._obj = name, value, obj

    def load(self):
        if isinstance(self._obj, Exception):
            raise self._obj
        return self._obj


def _digits_like(root):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (20, 8, 8, 1), generator=g, dtype=torch.uint8).numpy()
    y = (torch.arange(20) % 2).numpy()
    return from_numpy("test-plugin-data", x, y, x[:10], y[:10], ["a", "b"])


def test_entry_points_bring_a_plugin_model_and_dataset(monkeypatch):
    groups = {"mapprune.models": [_EntryPoint("test-plugin-net", "pkg.nets:make", lambda **kw: nn.Flatten())],
              "mapprune.datasets": [_EntryPoint("test-plugin-data", "pkg.data:load", _digits_like)],
              "mapprune.attacks": [_EntryPoint("stripe", "pkg.atk:Stripe", _Stripe)]}
    asked = []

    def entry_points(group=None):
        asked.append(group)
        return groups.get(group, [])

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    for reg in (MODELS, DATASETS, ATTACKS):
        monkeypatch.setattr(reg, "_plugins_loaded", False)
    try:
        assert "test-plugin-net" in MODELS
        net = create_model("test-plugin-net", 2)
        assert net(torch.zeros(1, 3, 2, 2)).shape == (1, 12)
        ds = load_dataset("test-plugin-data")
        assert ds.num_classes == 2 and "test-plugin-data" in DATASETS.names()
        assert attack_class("test-reg-stripe") is _Stripe  # a class registers under its own name
        assert create_model("smallcnn", 3, width=4) is not None
        assert asked.count("mapprune.models") == 1  # read once, on the first miss
    finally:
        MODELS.pop("test-plugin-net", None)
        DATASETS.pop("test-plugin-data", None)
        ATTACKS.pop("test-reg-stripe", None)


def test_a_broken_plugin_names_itself(monkeypatch):
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda group=None: [_EntryPoint("bad", "pkg.bad:Net", ImportError("no module named pkg"))])
    monkeypatch.setattr(MODELS, "_plugins_loaded", False)
    with pytest.raises(MapPruneError, match=r"the model plugin 'bad' \(pkg.bad:Net\) failed to load: no module"):
        create_model("missing-net", 10)


def test_attack_params_are_read_from_the_signature():
    assert _Stripe.option_names() == ["row", "colour"]
    assert create_attack("badnets", (3, 32, 32), 10).params() == {"patch_size": 3}
    assert create_attack("wanet", (3, 32, 32), 10, k=6).params() == {"k": 6, "s": 0.5, "grid_rescale": 1.0,
                                                                        "cross_ratio": 2.0, "field_seed": 20210101}
    assert list(create_attack("ssba", (3, 32, 32), 10).params())[-1] == "resource"

    class Kept(Attack):  # an option kept under another name is left out unless params() says otherwise
        name = "test-reg-kept"

        def __init__(self, image_shape, num_classes, *, size: int = 2, seed: int = 0, **kw):
            super().__init__(image_shape, num_classes, **kw)
            self.width, self.seed = size, seed

    assert Kept((3, 8, 8), 10, seed=4, target=2).params() == {"seed": 4}


def test_a_class_registers_only_under_its_own_name():
    with pytest.raises(MapPruneError, match="its own name"):
        ATTACKS.register("test-reg-other", _Stripe)
    assert "test-reg-other" not in ATTACKS
