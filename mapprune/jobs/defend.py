"""Defending a run folder: the same clean subset for every defense, before/after metrics, result.json, figures.

Writes ``RUN/defense/<name>/``: model.safetensors (unless detect-only), result.json, tensors.safetensors where
a defense made tensors worth keeping (NC's reversed triggers), and figures, built in a
``.partial`` folder and moved into place when complete.
"""

import json
import shutil
import time
from pathlib import Path

from ..checkpoint import atomic_save, save_model
from ..data import clean_subset
from ..defenses import create_defense, defense_class
from ..device import pick_device
from ..errors import MapPruneError
from ..metrics import der, evaluate
from ..runs import RunWriter, load_run, versions, write_json

# The protocol's clean share: 10% of the training set (FMT's), 5% for GTSRB.
DEFAULT_CLEAN_RATIO = {"gtsrb": 0.05}


def variant_name(defense: str, kw: dict) -> str:
    """Folder name of a defense variant (see :meth:`Defense.variant_name`)."""
    from ..defenses import defense_class

    return defense_class(defense).variant_name(kw)


def _json_equal(a, b) -> bool:
    return json.loads(json.dumps(a)) == json.loads(json.dumps(b))


def find_result(source, defense: str, params: dict, ratio: float, seed: int) -> Path | None:
    """A finished defense folder under ``source/defense/`` made with exactly these settings (same defense, every
    hyperparameter equal, the same clean subset), or None. Equality is over the full parameter set: a result
    written before a parameter existed matches only where the defense declares the value that reproduces it
    (``Defense.legacy``) and the cell has that value; options that only change what is reported
    (``Defense.report_only``) are not compared."""
    from ..defenses import defense_class

    cls = defense_class(defense)
    params = {k: v for k, v in params.items() if k not in cls.report_only}
    for res in sorted(Path(source, "defense").glob("*/result.json")):
        try:
            r = json.loads(res.read_text())
        except (OSError, ValueError):
            continue
        subset = r.get("clean_subset", {})
        stored = r.get("params")
        if isinstance(stored, dict):
            stored = {**{k: v for k, v in cls.legacy.items() if k in params and k not in stored}, **stored}
            stored = {k: v for k, v in stored.items() if k not in cls.report_only}
        if r.get("defense") == defense and _json_equal(stored, params) \
                and subset.get("ratio") == ratio and subset.get("seed") == seed:
            return res.parent
    return None


def adopt_result(found: Path, writer: RunWriter, run) -> dict:
    """Copies a finished defense folder through ``writer``, noting where it came from."""
    shutil.copytree(found, writer.partial, dirs_exist_ok=True)
    report = json.loads(writer.path("result.json").read_text())
    report.update({"run": str(run), "name": writer.out.name, "adopted_from": str(found)})
    write_json(writer.path("result.json"), report)
    writer.finish()
    return report


class NothingToAdopt(MapPruneError):
    """``adopt_only``: no finished result with exactly these settings; nothing was computed."""


def defend_run(run, defense: str, *, clean_ratio: float | None = None, name: str | None = None,
               data_dir=None, device=None, overwrite: bool = False, progress: bool = True, adopt_from=None,
               adopt_only: bool = False, **kw) -> dict:
    """Runs a defense on a finished attack run and writes RUN/defense/<name>/; returns result.json's content.
    ``adopt_from``: a run folder of the same model whose finished result with exactly these settings (see
    :func:`find_result`) is copied instead of recomputed; with ``adopt_only``, :class:`NothingToAdopt` is raised
    where there is none, before any work."""
    t_start = time.perf_counter()
    r = load_run(run, data_dir)
    ds_name = r.dataset.name
    ratio = clean_ratio if clean_ratio is not None else DEFAULT_CLEAN_RATIO.get(ds_name, 0.1)
    kw = {k: v for k, v in kw.items() if v is not None}
    cls = defense_class(defense)
    name = name or cls.variant_name(kw)  # from what the user chose, before per-dataset defaults
    for k, v in cls.dataset_defaults.get(ds_name, {}).items():
        kw.setdefault(k, v)
    out = Path(run) / "defense" / name
    writer = RunWriter(out, overwrite, marker="result.json")
    seed = kw.get("seed", 0)
    idx = clean_subset(r.dataset.y_train, ratio, seed)
    x, y = r.dataset.x_train[idx], r.dataset.y_train[idx]  # clean originals: the defender never sees poison
    kw.setdefault("hflip", r.dataset.hflip)
    d = create_defense(defense, device=device, progress=progress, **kw)
    found = adopt_from and find_result(adopt_from, defense, d.params(), ratio, seed)
    if found:
        return adopt_result(found, writer, run)
    if adopt_only:
        writer.discard_if_empty()
        raise NothingToAdopt(f"no finished {defense} result with these settings under {adopt_from}")
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
    if result.tensors:
        atomic_save(result.tensors, writer.path("tensors.safetensors"), {"defense": name})
    from ..report import save_defense_figures

    save_defense_figures(writer.partial, r.manifest, report, result, d.split(x, y), d)
    write_json(writer.path("result.json"), report)
    writer.finish()
    return report

