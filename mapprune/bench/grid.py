"""The grid file: reading a TOML grid into a :class:`Grid`, validating every attack, defense and option before any
work, expanding sweeps, refusing a grid that would run one cell twice, and reading a reference file of published
numbers."""

import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..attacks import ATTACKS, create_attack, load_plugins
from ..data import DATASETS, load_dataset
from ..defenses import DEFENSES, create_defense
from ..errors import MapPruneError, unknown_name
from ..jobs.cleanse import detector_names
from ..jobs.defend import DEFAULT_CLEAN_RATIO
from ..jobs.guard import detectors_from
from ..jobs.relapse import Reactivation, Retuning
from ..models import MODELS
from ..presets import PRESETS
from .keys import attack_label, defense_identity, defense_label, model_settings, settings_hash

GRID_KEYS = {"name", "dataset", "data_dir", "preset", "clean_ratio", "seeds", "model", "attack", "defense",
             "reference", "relapse", "cleanse", "guard"}
# What only changes how results are shown: not part of the grid's identity (bench.json's hash).
PRESENTATION_KEYS = {"reference", "_reference"}
ATTACK_KEYS = {"name", "opts", "poison_ratio", "target", "all_to_all", "train_seed", "run", "label", "adopt_defenses",
               "model"}
DEFENSE_KEYS = {"name", "opts", "label", "clean_ratio", "sweep"}
MODEL_KEYS = {"model", "width", "epochs", "batch_size", "lr", "schedule", "eval_every"}
# [relapse]: `mapprune relapse` on every model and defended model of the grid, beside the clean control's
# [cleanse] and [guard]: `mapprune cleanse` on every model's training set, `mapprune guard` on every model
CLEANSE_KEYS = {"detectors", "expected", "layer"}
GUARD_KEYS = {"detectors", "fpr", "test_images"}
RELAPSE_KEYS = {"control", "seeds", "images", "poisoned", "epochs", "lr", "batch_size", "reactivation",
                "reactivation_eps", "reactivation_steps", "reactivation_images"}


@dataclass
class Sweep:
    """One swept option of a [[defense]]: the curve of ``param`` over ``points``, (value, defense label) pairs in
    the order drawn; the label equal to ``defense`` is the entry's own setting."""

    defense: str
    param: str
    points: list[tuple]


@dataclass
class Grid:
    """A validated grid file. ``attacks`` and ``defenses`` are its [[attack]] and [[defense]] tables (each sweep
    expanded into one more defense per value); ``reference`` the published numbers of its reference file."""

    name: str
    dataset: str
    seeds: list[int]
    attacks: list[dict]
    defenses: list[dict]
    data_dir: str | None = None
    preset: str | None = None
    clean_ratio: float | None = None
    model: dict = field(default_factory=dict)
    reference_file: str | None = None
    reference: dict | None = None
    relapse: dict | None = None  # the [relapse] table, validated; None: no relapse cells
    cleanse: dict | None = None  # the [cleanse] table, validated; None: no cleanse cells
    guard: dict | None = None  # the [guard] table, validated; None: no guard cells
    sweeps: list[Sweep] = field(default_factory=list)
    file_keys: tuple[str, ...] = ()  # the file's top-level keys in the file's order (``seeds``, ``defense`` added)

    def to_dict(self) -> dict:
        """The grid as bench.json records it: the file's keys in its order, then ``_sweeps`` and ``_reference``
        (the expanded sweeps and the published numbers) where the grid has them."""
        values = {"name": self.name, "dataset": self.dataset, "data_dir": self.data_dir, "preset": self.preset,
                  "clean_ratio": self.clean_ratio, "seeds": self.seeds, "model": self.model, "attack": self.attacks,
                  "defense": self.defenses, "reference": self.reference_file, "relapse": self.relapse,
                  "cleanse": self.cleanse, "guard": self.guard}
        out = {k: values[k] for k in self.file_keys}
        if self.sweeps:
            out["_sweeps"] = [asdict(s) for s in self.sweeps]
        if self.reference is not None:
            out["_reference"] = self.reference
        return out

    def digest(self) -> str:
        """The grid's identity (bench.json's grid_hash): a hash of every setting but the presentation ones."""
        return settings_hash({k: v for k, v in self.to_dict().items() if k not in PRESENTATION_KEYS})

    def attack_labels(self) -> list[str]:
        """The labels of the grid's attacks, in the file's order."""
        return [attack_label(a) for a in self.attacks]


def load_grid(path) -> Grid:
    """Reads and validates a grid file; every attack, defense and option is checked here, before any work."""
    path = Path(path)
    table = _read_toml(path, f"grid file {path} not found")
    _only(table, GRID_KEYS, f"{path}")
    for k in ("name", "dataset"):
        if not isinstance(table.get(k), str) or not table[k]:
            raise MapPruneError(f"{path}: the grid needs a {k!r} (a string)")
    _only(table.get("model", {}), MODEL_KEYS, f"{path} [model]")
    seeds = table.setdefault("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise MapPruneError(f"{path}: seeds must be a non-empty list of non-negative integers, got {seeds!r}")
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise MapPruneError(f"{path}: seeds = {seeds!r} repeats {', '.join(map(str, repeated))}; give each seed once")
    if not table.get("attack"):
        raise MapPruneError(f"{path}: a grid needs at least one [[attack]]")
    table.setdefault("defense", [])  # a grid of models only (a population) trains its models and stops
    grid = Grid(name=table["name"], dataset=table["dataset"], seeds=seeds, attacks=table["attack"],
                defenses=table["defense"], data_dir=table.get("data_dir"), preset=table.get("preset"),
                clean_ratio=table.get("clean_ratio"), model=table.get("model", {}),
                reference_file=table.get("reference"), relapse=table.get("relapse"), cleanse=table.get("cleanse"),
                guard=table.get("guard"), file_keys=tuple(table))
    _expand_sweeps(grid, path)
    _check_names(grid, path)
    _check_duplicates(grid, path)
    if grid.relapse is not None:
        _check_relapse(grid, path)
    if grid.cleanse is not None:
        _check_detection(grid.cleanse, CLEANSE_KEYS, f"{path} [cleanse]")
    if grid.guard is not None:
        _check_detection(grid.guard, GUARD_KEYS, f"{path} [guard]")
    if "reference" in table:
        if not isinstance(grid.reference_file, str) or not grid.reference_file:
            raise MapPruneError(f"{path}: reference must be the path of a TOML file of published numbers")
        grid.reference = load_reference(path.parent / grid.reference_file)
    return grid


def _read_toml(path: Path, missing: str) -> dict:
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise MapPruneError(missing) from None
    except tomllib.TOMLDecodeError as e:
        raise MapPruneError(f"{path} is not valid TOML: {e}") from None


def load_reference(path) -> dict:
    """Published numbers to print beside a grid's own: {"name", "cells": {attack: {defense: [acc, asr, ra]}}},
    percentages as written in the file (validated here, before any work)."""
    path = Path(path)
    ref = _read_toml(path, f"reference file {path} not found (a grid's reference is relative to the grid file)")
    _only(ref, {"name", "source", "note", "cells"}, f"{path}")
    if not isinstance(ref.get("name"), str) or not ref["name"]:
        raise MapPruneError(f"{path}: a reference needs a 'name' (a string) saying whose numbers these are")
    cells = ref.get("cells")
    if not isinstance(cells, dict) or not cells:
        raise MapPruneError(f"{path}: a reference needs a [cells] table: attack = {{defense = [ACC, ASR, RA]}}")
    for attack, row in cells.items():
        if not isinstance(row, dict):
            raise MapPruneError(f"{path}: cells.{attack} must be a table of defense = [ACC, ASR, RA]")
        for defense, v in row.items():
            if (not isinstance(v, list) or len(v) != 3 or
                    not all(isinstance(x, int | float) and not isinstance(x, bool) and 0 <= x <= 100 for x in v)):
                raise MapPruneError(f"{path}: cells.{attack}.{defense} must be [ACC, ASR, RA], three percentages "
                                    f"in 0..100, got {v!r}")
    return {"name": ref["name"], "cells": cells}


def _expand_sweeps(grid: Grid, path) -> None:
    """Each ``sweep = {option = [values]}`` of a [[defense]] becomes one more [[defense]] per value, that one option
    changed from the entry's own settings; ``grid.sweeps`` remembers which entries form each curve."""
    expanded, sweeps = [], []
    for i, d in enumerate(grid.defenses):
        sweep = d.pop("sweep", None)
        expanded.append(d)
        if sweep is None:
            continue
        where = f"{path} [[defense]] #{i + 1}"
        if not isinstance(sweep, dict) or not sweep or not all(isinstance(v, list) and v for v in sweep.values()):
            raise MapPruneError(f"{where}: sweep is a table of option = [values], e.g. sweep = {{eps = [0.02, 0.1]}}")
        if "label" in d:
            raise MapPruneError(f"{where}: a swept defense is labelled by its settings; drop label")
        opts = dict(d.get("opts", {}))
        try:
            params = create_defense(d["name"], **opts).params()
        except MapPruneError as e:
            raise MapPruneError(f"{where}: {e}") from None
        ratio = d.get("clean_ratio", grid.clean_ratio if grid.clean_ratio is not None
                      else DEFAULT_CLEAN_RATIO.get(grid.dataset, 0.1))
        base = defense_label(d)
        for param, values in sweep.items():
            if param != "clean_ratio" and param not in params:
                raise MapPruneError(f"{where}: {d['name']} has no option {param!r} to sweep; valid: "
                                    f"{', '.join(sorted(params))}, clean_ratio")
            default = ratio if param == "clean_ratio" else params[param]
            points = [(default, base)]
            for v in values:
                if v == default:
                    continue
                entry = {"name": d["name"], "opts": opts, "clean_ratio": v} if param == "clean_ratio" else \
                    {"name": d["name"], "opts": {**opts, param: v}, **({"clean_ratio": d["clean_ratio"]}
                                                                     if "clean_ratio" in d else {})}
                if param != "clean_ratio":
                    try:  # each swept value is refused here, before any cell runs, as the defense would refuse it
                        create_defense(d["name"], **entry["opts"])
                    except MapPruneError as e:
                        raise MapPruneError(f"{where}: sweep {param} = {v!r}: {e}") from None
                expanded.append(entry)
                points.append((v, entry.get("label") or defense_label(entry)))
            try:
                points.sort(key=lambda p: p[0])
            except TypeError:  # a default of None (e.g. FMT's budget: the rank rule's count) stays first
                pass
            sweeps.append(Sweep(base, param, points))
    grid.defenses = expanded
    grid.sweeps = sweeps


def _only(table: dict, allowed: set, where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise MapPruneError(f"{where}: unknown key {unknown[0]!r}; valid keys: {', '.join(sorted(allowed))}")


def _check_names(grid: Grid, path) -> None:
    load_plugins()

    if grid.dataset not in DATASETS:
        raise unknown_name("dataset", grid.dataset, DATASETS)
    if grid.preset is not None and grid.preset not in PRESETS:
        raise unknown_name("preset", grid.preset, PRESETS)
    if grid.model.get("model") is not None and grid.model["model"] not in MODELS:  # `in` loads plugins
        raise unknown_name("model", grid.model["model"], MODELS)
    probe = _AttackProbe(grid)
    labels = set()
    for i, a in enumerate(grid.attacks):
        where = f"{path} [[attack]] #{i + 1}"
        _only(a, ATTACK_KEYS, where)
        if not isinstance(a.get("model", {}), dict):
            raise MapPruneError(f"{where}: model is a table of training settings, e.g. model = {{model = \"vgg16_bn\"}}")
        _only(a.get("model", {}), MODEL_KEYS, f"{where} model")
        if "run" in a and "model" in a:
            raise MapPruneError(f"{where}: an adopted run keeps its own model; drop model")
        if a.get("model", {}).get("model") is not None and a["model"]["model"] not in MODELS:
            raise unknown_name("model", a["model"]["model"], MODELS)
        if a.get("name") not in ATTACKS and "run" not in a:
            raise MapPruneError(f"{where}: unknown attack {a.get('name')!r}; valid attacks: {', '.join(ATTACKS)}")
        if "run" in a and not (Path(a["run"]) / "manifest.json").is_file():
            raise MapPruneError(f"{where}: {a['run']} is not a finished run folder (no manifest.json)")
        if a.get("adopt_defenses") and "run" not in a:
            raise MapPruneError(f"{where}: adopt_defenses adopts the defense results of an adopted run; give run = "
                                "\"path\" too")
        if "run" not in a:
            valid = ATTACKS[a["name"]].option_names()  # the base's target / ratio are grid keys
            for k in a.get("opts", {}):
                if k not in valid:
                    raise MapPruneError(f"{where}: attack {a['name']} has no option {k!r} (target, poison_ratio and "
                                        f"all_to_all are keys of [[attack]] itself); valid: {', '.join(valid)}")
            probe.build(a, where)
        label = attack_label(a)
        if label in labels:
            raise MapPruneError(f"{where}: two attacks are labelled {label!r}; give one a distinct label = \"...\"")
        labels.add(label)
    labels = set()
    for i, d in enumerate(grid.defenses):
        where = f"{path} [[defense]] #{i + 1}"
        _only(d, DEFENSE_KEYS, where)
        if d.get("name") not in DEFENSES:
            raise MapPruneError(f"{where}: unknown defense {d.get('name')!r}; valid defenses: {', '.join(DEFENSES)}")
        if "seed" in d.get("opts", {}):
            raise MapPruneError(f"{where}: give defense seeds with the grid's seeds = [...], not as an option")
        try:
            create_defense(d["name"], **d.get("opts", {}))
        except MapPruneError as e:
            raise MapPruneError(f"{where}: {e}") from None
        label = defense_label(d)
        if label in labels:
            raise MapPruneError(f"{where}: two defenses are labelled {label!r}; give one a distinct label")
        labels.add(label)


def relapse_settings(table: dict) -> tuple[Retuning, Reactivation | None, list[int]]:
    """The retuning and reactivation settings and the seeds of a validated [relapse] table."""
    retuning = Retuning(**{k: table[k] for k in ("images", "poisoned", "epochs", "lr", "batch_size") if k in table})
    reactivation = None if not table.get("reactivation", True) else Reactivation(
        **{k.removeprefix("reactivation_"): table[k] for k in ("reactivation_eps", "reactivation_steps",
                                                               "reactivation_images") if k in table})
    return retuning, reactivation, list(table.get("seeds", [0]))


def _check_relapse(grid: Grid, path) -> None:
    table, where = grid.relapse, f"{path} [relapse]"
    if not isinstance(table, dict):
        raise MapPruneError(f"{where}: relapse is a table, e.g. [relapse] control = \"clean\"")
    _only(table, RELAPSE_KEYS, where)
    control = table.get("control")
    by_label = {attack_label(a): a for a in grid.attacks}
    if control not in by_label:
        raise MapPruneError(f"{where}: control names the grid's clean model by its [[attack]] label; got {control!r} "
                            f"(labels: {', '.join(by_label)})")
    if "run" not in by_label[control] and by_label[control].get("poison_ratio", 0.1) != 0:
        raise MapPruneError(f"{where}: the control {control!r} is a backdoored model; give it poison_ratio = 0")
    seeds = table.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or len(set(seeds)) != len(seeds) or \
            not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in seeds):
        raise MapPruneError(f"{where}: seeds is a list of distinct non-negative whole numbers, got {seeds!r}")
    for k in ("images", "poisoned", "epochs", "batch_size", "reactivation_steps", "reactivation_images"):
        if k in table and (not isinstance(table[k], int) or isinstance(table[k], bool)):
            raise MapPruneError(f"{where}: {k} is a whole number, got {table[k]!r}")
    for k in ("lr", "reactivation_eps"):
        if k in table and (not isinstance(table[k], int | float) or isinstance(table[k], bool)):
            raise MapPruneError(f"{where}: {k} is a number, got {table[k]!r}")
    if "reactivation" in table and not isinstance(table["reactivation"], bool):
        raise MapPruneError(f"{where}: reactivation is true or false, got {table['reactivation']!r}")
    retuning, reactivation, _ = relapse_settings(table)
    try:
        retuning.check()
        if reactivation is not None:
            reactivation.check()
    except MapPruneError as e:
        raise MapPruneError(f"{where}: {e}") from None


def _check_detection(table, keys: set, where: str) -> None:
    """A [cleanse] or [guard] table: its detectors known, its numbers in range (as the commands check them)."""
    if not isinstance(table, dict):
        raise MapPruneError(f"{where}: a table of settings, e.g. detectors = [\"all\"]")
    _only(table, keys, where)
    detectors = table.get("detectors", ["all"])
    if not isinstance(detectors, list) or not detectors or not all(isinstance(d, str) for d in detectors):
        raise MapPruneError(f"{where}: detectors is a list of detector names (or [\"all\"]), got {detectors!r}")
    for k in ("expected", "fpr"):
        if k in table and (isinstance(table[k], bool) or not isinstance(table[k], int | float) or not 0 < table[k] < 1):
            raise MapPruneError(f"{where}: {k} is a fraction in (0, 1), got {table[k]!r}")
    if "test_images" in table and (isinstance(table["test_images"], bool) or not isinstance(table["test_images"], int)
                                   or table["test_images"] < 1):
        raise MapPruneError(f"{where}: test_images is a whole number of at least 1, got {table['test_images']!r}")
    if "layer" in table and not isinstance(table["layer"], str):
        raise MapPruneError(f"{where}: layer is a module name or \"penultimate\", got {table['layer']!r}")
    try:
        if keys is CLEANSE_KEYS:
            detector_names(detectors)
        else:
            detectors_from(detectors)
    except MapPruneError as e:
        raise MapPruneError(f"{where}: {e}") from None


def _check_duplicates(grid: Grid, path) -> None:
    """Two attacks, or two defenses, whose settings are identical (whatever their labels) would be one cell twice:
    refused, naming both."""
    seen: dict = {}
    for a in grid.attacks:
        key = settings_hash(model_settings(grid, a)[0])
        if key in seen:
            raise MapPruneError(f"{path}: attacks {seen[key]!r} and {attack_label(a)!r} have identical settings "
                                "(one model twice); drop one")
        seen[key] = attack_label(a)
    seen = {}
    for d in grid.defenses:
        key = settings_hash(defense_identity(grid, d))
        if key in seen:
            raise MapPruneError(f"{path}: defenses {seen[key]!r} and {defense_label(d)!r} have identical settings "
                                "(one defense twice); drop one")
        seen[key] = defense_label(d)


class _AttackProbe:
    """Builds each attack once (no training), so a bad option value fails now, not after other cells ran; the
    dataset's image shape and class count are read on the first attack that needs them."""

    def __init__(self, grid: Grid):
        self.grid = grid
        self.shape: tuple | None = None

    def build(self, a: dict, where: str) -> None:
        if self.shape is None:
            ds = load_dataset(self.grid.dataset, self.grid.data_dir)
            self.shape = (ds.image_shape, ds.num_classes)
        shape, classes = self.shape
        try:
            create_attack(a["name"], shape, classes, target=a.get("target", 0), poison_ratio=a.get("poison_ratio", 0.1),
                          all_to_all=a.get("all_to_all", False), **a.get("opts", {}))
        except MapPruneError as e:
            raise MapPruneError(f"{where}: {e}") from None
        except (TypeError, ValueError) as e:
            raise MapPruneError(f"{where}: bad option value for attack {a['name']}: {e}") from None
