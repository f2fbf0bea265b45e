"""How a grid's cells are named and keyed: labels of attacks and defenses, and the settings whose hash is a cell's
key. A finished cell is found again by its key, so every change here changes which cells count as done
(tests/test_bench_keys.py pins the keys of known grids)."""

import hashlib
import json
from pathlib import Path

from ..defenses import defense_class
from ..migrate import format1_params
from ..runs import read_manifest


def settings_hash(settings: dict) -> str:
    """A stable 10-hex-digit hash of JSON-able settings (key order does not matter)."""
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def resolved_params(defense: str, opts: dict, dataset: str) -> dict:
    """Every hyperparameter the defense will run with (its recipe's and the dataset's defaults, then the grid's
    options): hashed into the cell's key, so a default changed in the code (a new recommended recipe) makes a new
    cell instead of passing off a result of the old one as current."""
    cls = defense_class(defense)
    # Hashed under the old option names (mapprune.migrate.format1_params), so finished cells keep their keys.
    out = {**format1_params(defense, cls.defaults(opts.get("recipe")), defaults=True),
           **format1_params(defense, {**cls.dataset_defaults.get(dataset, {}), **opts})}
    return {k: v for k, v in out.items() if k not in ("seed", "progress")}


def attack_label(a: dict) -> str:
    """An [[attack]]'s label: its ``label``, else its attack name, else the adopted run folder's name."""
    return a.get("label") or a.get("name") or Path(a["run"]).name


def defense_label(d: dict) -> str:
    """A [[defense]]'s label: its ``label``, else the defense's variant name of its options (and its own clean
    ratio, where it sets one)."""
    if d.get("label"):
        return d["label"]
    ratio = f"-ratio{d['clean_ratio']:g}" if "clean_ratio" in d else ""
    return defense_class(d["name"]).variant_name(dict(d.get("opts", {}))) + ratio


def model_settings(grid, a: dict) -> tuple[dict, str]:
    """(the settings that key an attack's model cell, the dataset it was trained on); ``grid`` is a
    :class:`~mapprune.bench.grid.Grid`."""
    if "run" in a:
        m = read_manifest(Path(a["run"]))
        settings = {"adopt": {k: m.get(k) for k in ("attack", "model", "train", "seed")},
                    "dataset": m["dataset"]["fingerprint"]}
        return settings, m["dataset"]["name"]
    model_kw = {**grid.model, **a.get("model", {})}  # an attack's own [model] keys win
    settings = {"dataset": grid.dataset, "preset": grid.preset, "model": model_kw,
                "attack": a["name"], "opts": a.get("opts", {}), "poison_ratio": a.get("poison_ratio", 0.1),
                "target": a.get("target", 0), "all_to_all": a.get("all_to_all", False),
                "train_seed": a.get("train_seed", 0)}
    return settings, grid.dataset


def defense_identity(grid, d: dict) -> dict:
    """What makes two [[defense]] entries one defense twice, whatever their labels (the duplicate check)."""
    return {"defense": d["name"], "opts": d.get("opts", {}), "clean_ratio": d.get("clean_ratio", grid.clean_ratio)}


def defense_settings(grid, d: dict, model_key: str, dataset: str) -> dict:
    """The settings of a [[defense]] on one model (without the seed): hashed, with the seed, into the defense
    cell's key, and without the model into its folder's name."""
    return {"model": model_key, "defense": d["name"], "opts": d.get("opts", {}),
            "params": resolved_params(d["name"], d.get("opts", {}), dataset),
            "clean_ratio": d.get("clean_ratio", grid.clean_ratio)}
