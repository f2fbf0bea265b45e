"""Defending a run folder: the same clean subset for every defense, before/after metrics, result.json, figures.

Writes ``RUN/defense/<name>/``: model.safetensors (unless detect-only), result.json and figures, built in a
``.partial`` folder and moved into place when complete.
"""

import time
from pathlib import Path

from .checkpoint import save_model
from .data import clean_subset
from .defenses import create_defense
from .device import pick_device
from .metrics import der, evaluate
from .runs import RunWriter, load_run, versions, write_json

# FMT's own configurations: 10% of the training set for CIFAR, 5% for GTSRB; alpha 0.03 off CIFAR-10.
DEFAULT_CLEAN_RATIO = {"gtsrb": 0.05}
DEFAULT_ALPHA = {"cifar100": 0.03, "gtsrb": 0.03}


def _recipe_defaults(defense: str, recipe: str) -> dict:
    from .defenses.base import FINETUNES
    from .defenses.fmt import FMT_RECIPES

    return {**FINETUNES.get(recipe, {}), **(FMT_RECIPES.get(recipe, {}) if defense == "fmt" else {})}


def variant_name(defense: str, kw: dict) -> str:
    """Folder name of a defense variant: the defense, its recipe unless ``recommended`` (fmt-paper), then every
    option given that differs from the recipe's value (fmt-paper-mask, fmt-outlier, fmt-eps0.1), -detect for a
    detect-only run, and -seedN for seed N != 0. Two different settings never share a folder."""
    recipe = kw.get("recipe", "recommended")
    import inspect

    from .defenses import DEFENSES
    from .defenses.base import Defense

    defaults = {}
    for cls in (Defense, DEFENSES.get(defense, Defense)):
        defaults.update({k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()
                         if p.default is not inspect.Parameter.empty and p.default is not None})
    defaults.update(_recipe_defaults(defense, recipe))
    name = defense if recipe == "recommended" else f"{defense}-{recipe}"
    for k, v in kw.items():
        if k in ("recipe", "seed", "detect_only") or v is None or defaults.get(k, None) == v:
            continue
        if k == "selection":
            name += f"-{v}"
        elif isinstance(v, bool):
            name += f"-{k.replace('_', '')}" if v else f"-no{k.replace('_', '')}"
        else:
            name += f"-{k.replace('_', '')}{v:g}" if isinstance(v, float) else f"-{k.replace('_', '')}{v}"
    if kw.get("detect_only"):
        name += "-detect"
    if kw.get("seed"):
        name += f"-seed{kw['seed']}"
    return name


def defend_run(run, defense: str, *, clean_ratio: float | None = None, name: str | None = None,
               data_dir=None, device=None, overwrite: bool = False, progress: bool = True, **kw) -> dict:
    """Runs a defense on a finished attack run and writes RUN/defense/<name>/; returns result.json's content."""
    t_start = time.perf_counter()
    r = load_run(run, data_dir)
    ds_name = r.dataset.name
    ratio = clean_ratio if clean_ratio is not None else DEFAULT_CLEAN_RATIO.get(ds_name, 0.1)
    kw = {k: v for k, v in kw.items() if v is not None}
    name = name or variant_name(defense, kw)  # from what the user chose, before per-dataset defaults
    if defense == "fmt":
        kw.setdefault("alpha", DEFAULT_ALPHA.get(ds_name, 0.02))
    out = Path(run) / "defense" / name
    writer = RunWriter(out, overwrite, marker="result.json")
    seed = kw.get("seed", 0)
    idx = clean_subset(r.dataset.y_train, ratio, seed)
    x, y = r.dataset.x_train[idx], r.dataset.y_train[idx]  # clean originals: the defender never sees poison
    d = create_defense(defense, hflip=r.dataset.hflip, device=device, progress=progress, **kw)
    dev = pick_device(device)
    test_sets = r.test_sets()
    before = evaluate(r.model.to(dev), test_sets)
    result = d.repair(r.model, x, y)
    detect_only = kw.get("detect_only", False)
    after = before if detect_only else evaluate(result.model, test_sets)
    report = {
        "kind": "defense",
        "run": str(run),
        "name": name,
        "clean_subset": {"ratio": ratio, "seed": seed, "count": len(idx), "indices": idx.tolist()},
        "before": before,
        "after": after,
        "der": der(before, after),
        "versions": versions(),
        "wall_s": time.perf_counter() - t_start,
        **result.to_json(),
    }
    if not detect_only:
        save_model(result.model.cpu(), writer.path("model.safetensors"), {"defense": name})
    from .report import save_defense_figures

    save_defense_figures(writer.partial, r.manifest, report, result, x, y, d)
    write_json(writer.path("result.json"), report)
    writer.finish()
    return report

