"""Saved files of every earlier format, read as the current one.

A run's manifest.json and a defense's result.json carry ``schema_version`` (a file without it is version 0). The
readers (:func:`mapprune.runs.read_manifest`, :func:`mapprune.runs.read_result`) pass every file through
:func:`upgrade_manifest` or :func:`upgrade_result`, which bring it step by step to the current version, so the
rest of the code, the defenses included, sees one format only. A file of a version newer than this code knows is
refused with :class:`NewerFormat`.

To change a format: raise its ``*_VERSION``, append a step (``dict -> dict``, from the previous version to the new
one) to its ``*_STEPS``, and write the new version's files with the new content.
"""

import json
from collections.abc import Callable

from .defenses.fmt.config import CONFIGS, EXPERT, FINETUNE_EXPERT
from .errors import MapPruneError

MANIFEST_VERSION = 1
RESULT_VERSION = 1


class NewerFormat(MapPruneError):
    """A saved file written by a newer mapprune, in a format this one cannot read."""


# The shared fine-tune (base.FINETUNES) before ``relearn_lr`` existed never changed its learning rate.
_FINETUNE_LEGACY = {"relearn_lr": 0.0}

# Options each defense gained after its results were first saved, with the value that reproduces what it did before
# the option existed: a version-0 result whose params lack such an option was made with that value (FMT: the
# unlearning share was split over the candidate triggers and stamped in place, and every candidate field was judged
# on all n_images against the "sign" null).
LEGACY_PARAMS: dict[str, dict] = {
    "ft": _FINETUNE_LEGACY,
    "fp": _FINETUNE_LEGACY,
    "nc": _FINETUNE_LEGACY,
    "fmt": {**_FINETUNE_LEGACY, "unlearn_each": False, "unlearn_append": False, "field_images": 0,
            "field_null": "sign"},
}


def _manifest_0_to_1(m: dict) -> dict:
    """Manifests written before the dataset's loader name and folder were recorded: the dataset was loaded by its
    name, from the loader's default place."""
    ds = m.get("dataset")
    if isinstance(ds, dict) and isinstance(ds.get("name"), str):
        m = {**m, "dataset": {"registry": ds["name"], "data_dir": None, **ds}}
    return m


def _result_0_to_1(r: dict) -> dict:
    """Fills the options a defense gained later with their values of before (``LEGACY_PARAMS``), and the recipe of
    fine-tuning results written before recipes existed (all were made with the paper's; a defense that does not
    fine-tune has no recipe)."""
    params = r.get("params")
    if not isinstance(params, dict):
        return r
    r = dict(r)
    legacy = LEGACY_PARAMS.get(r.get("defense")) if isinstance(r.get("defense"), str) else None
    if legacy:
        r["params"] = {**params, **{k: v for k, v in legacy.items() if k not in params}}
    if "recipe" not in r and "epochs" in params:
        r["recipe"] = "paper"
    return r


# FMT's recipe is one config (mapprune/defenses/fmt/config.py). Results of every version are read under its option
# names (:func:`fmt_names`, applied to every result read, whatever its version): two options renamed for what they are
# (old name -> new name); the research switches below, no longer options, at the value every FMT runs with; and the
# expert settings, which params records only where they differ from the recipe's value.
RENAMED: dict[str, dict[str, str]] = {"fmt": {"unlearn_warp": "warp_px", "unlearn_smooth": "smooth_linf"}}
RETIRED: dict[str, dict] = {"fmt": {"scorer": "accuracy", "outlier_method": "elliptic", "contamination": 0.1,
                                    "threshold": 3.5, "unlearn_append": False, "unlearn_candidates": "probe",
                                    "implementation": "fast"}}
# Options left out of a bench cell's resolved parameters at these values: their default was None under the old
# names, or they came later (``gate``) and their default does what FMT did before they existed.
_UNSET_OLD: dict[str, dict] = {"fmt": {"budget": None, "field_null": "sign", "gate": False}}


def expert_values(defense: str, recipe) -> dict:
    """The expert settings' values under ``recipe`` (FMT's), which format 2 leaves out of params."""
    if defense != "fmt":
        return {}
    config = CONFIGS.get(recipe if isinstance(recipe, str) else "recommended")
    return {k: getattr(config, k) for k in EXPERT + FINETUNE_EXPERT} if config else {}


def fmt_names(r: dict) -> dict:
    """FMT's params under the current names: renamed options renamed; a retired switch at the value FMT now runs
    with, and an expert setting at its recipe's value, dropped (any other value is kept, so the result matches no
    current setting). A result already in these names is returned as it is."""
    params, defense = r.get("params"), r.get("defense")
    if not isinstance(params, dict) or defense not in RENAMED:
        return r
    names = RENAMED[defense]
    params = {names.get(k, k): v for k, v in params.items()}
    drop = {**RETIRED[defense], **expert_values(defense, params.get("recipe"))}
    params = {k: v for k, v in params.items() if not (k in drop and v == drop[k] and type(v) is type(drop[k]))}
    return {**r, "params": params}


def format1_params(defense: str, params: dict, defaults: bool = False) -> dict:
    """``params`` (current names) under the old option names: renamed options under their old names and the
    switches no longer options at their values; with ``defaults`` (a defense's resolved defaults), without the
    options whose old default was None. What bench cell keys hash, so that the keys of finished cells hold."""
    old = {new: o for o, new in RENAMED.get(defense, {}).items()}
    out = {old.get(k, k): v for k, v in params.items()}
    if defaults:
        out = {k: v for k, v in out.items() if k not in _UNSET_OLD.get(defense, {})
               or v != _UNSET_OLD[defense][k]}
    return {**RETIRED.get(defense, {}), **out}


MANIFEST_STEPS: list[Callable[[dict], dict]] = [_manifest_0_to_1]
RESULT_STEPS: list[Callable[[dict], dict]] = [_result_0_to_1]


def schema_version(d: dict, source="the file") -> int:
    """``d``'s ``schema_version`` (0 where it has none); a value that is not a whole number >= 0 is an error naming
    ``source``."""
    v = d.get("schema_version", 0)
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        shown = json.dumps(v)
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        raise MapPruneError(f"{source} is damaged: 'schema_version' is {shown}, not a whole number >= 0; restore it "
                            "from a copy or write it again")
    return v


def _upgrade(d: dict, steps: list, current: int, source) -> dict:
    v = schema_version(d, source)
    if v > current:
        raise NewerFormat(f"{source} was written by a newer mapprune (schema_version {v}; this one reads up to "
                          f"{current}); upgrade mapprune to read it")
    for step in steps[v:]:
        d = step(d)
    return {"schema_version": current, **{k: val for k, val in d.items() if k != "schema_version"}}


def upgrade_manifest(d: dict, source="manifest.json") -> dict:
    """A run's manifest of any known version, as the current version's (a new dict; ``d`` is left as it is).
    Raises :class:`NewerFormat` for a version newer than :data:`MANIFEST_VERSION`."""
    return _upgrade(d, MANIFEST_STEPS, MANIFEST_VERSION, source)


def upgrade_result(d: dict, source="result.json") -> dict:
    """A defense's result of any known version, as the current version's (a new dict; ``d`` is left as it is).
    Raises :class:`NewerFormat` for a version newer than :data:`RESULT_VERSION`."""
    return fmt_names(_upgrade(d, RESULT_STEPS, RESULT_VERSION, source))
