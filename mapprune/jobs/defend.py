"""Defending a run folder: the same clean subset for every defense, before/after metrics, result.json, figures.

Writes ``RUN/defense/<name>/``: model.safetensors (unless detect-only), result.json, tensors.safetensors where
a defense made tensors worth keeping (NC's reversed triggers), and figures, built in a
``.partial`` folder and moved into place when complete.
"""

import json
import os
import shutil
import time
from pathlib import Path

from ..checkpoint import atomic_save, save_model
from ..data import clean_subset
from ..defenses import create_defense, defense_class
from ..device import pick_device
from ..errors import MapPruneError
from ..figures import save_defense_figures
from ..metrics import der, evaluate
from ..migrate import RESULT_VERSION, NewerFormat
from ..runs import RunWriter, load_run, read_result, versions, write_json

# The protocol's clean share: 10% of the training set (FMT's), 5% for GTSRB.
DEFAULT_CLEAN_RATIO = {"gtsrb": 0.05}


def variant_name(defense: str, kw: dict) -> str:
    """Folder name of a defense variant (see :meth:`Defense.variant_name`)."""
    return defense_class(defense).variant_name(kw)


def _json_equal(a, b) -> bool:
    return json.loads(json.dumps(a)) == json.loads(json.dumps(b))


# What find_result and adopt_result read of a result.json.
ADOPT_KEYS = {"defense": str, "params?": dict, "clean_subset": {"ratio?": float, "seed?": (int, None)}}


def find_result(source, defense: str, params: dict, ratio: float, seed: int) -> Path | None:
    """A finished defense folder under ``source/defense/`` made with exactly these settings (same defense, every
    hyperparameter equal, the same clean subset), or None. Equality is over the full parameter set, as the result
    reads in the current format (:func:`mapprune.migrate.upgrade_result` gives an older result the options added
    since with the values it was made with); options that only change what is reported (``Defense.report_only``)
    are not compared. A damaged result.json is passed over; one written by a newer mapprune is an error."""
    report_only = defense_class(defense).report_only
    params = {k: v for k, v in params.items() if k not in report_only}
    for res in sorted(Path(source, "defense").glob("*/result.json")):
        try:
            r = read_result(res.parent, ADOPT_KEYS)
        except NewerFormat:
            raise
        except (MapPruneError, OSError):
            continue
        subset = r["clean_subset"]
        stored = r.get("params")
        if isinstance(stored, dict):
            stored = {k: v for k, v in stored.items() if k not in report_only}
        if r["defense"] == defense and _json_equal(stored, params) \
                and subset.get("ratio") == ratio and subset.get("seed") == seed:
            return res.parent
    return None


def adopt_result(found: Path, writer: RunWriter, run) -> dict:
    """Copies a finished defense folder through ``writer``, noting where it came from; its result.json is written
    in the current format."""
    shutil.copytree(found, writer.partial, dirs_exist_ok=True)
    report = read_result(writer.partial, ADOPT_KEYS)
    report.update({"run": str(run), "name": writer.out.name, "adopted_from": str(found)})
    write_json(writer.path("result.json"), report)
    writer.finish()
    return report


def check_variant_name(name: str) -> None:
    """Refuses a defense folder name that is not one plain folder under RUN/defense/: empty, with a path separator,
    starting with '.' (hidden, or '..' leaving the run) or ending in '.partial' (an unfinished folder's name)."""
    seps = {"/", "\\", os.sep} | ({os.altsep} if os.altsep else set())
    if not name or name.startswith(".") or name.endswith(".partial") or "\0" in name or any(c in name for c in seps):
        raise MapPruneError(f"--name {name!r} is not a plain folder name: give one without '/' or '\\', not starting "
                            "with '.' (it names the folder under RUN/defense/, e.g. --name ft-short)")


def _check_defense_folder(out: Path, overwrite: bool) -> None:
    """Refuses, before any work, a defense folder that is taken: a finished result without ``overwrite``, or a
    file or folder that holds no result (``overwrite`` replaces results only)."""
    if out.exists() and not out.is_dir():
        raise MapPruneError(f"{out} exists and is not a folder; pass --name NAME to write the result under another "
                            "name")
    if (out / "result.json").is_file():
        if not overwrite:
            raise MapPruneError(f"{out} already holds a defense result; pass --overwrite to replace it or --name NAME "
                                "to keep both")
    elif out.is_dir() and any(out.iterdir()):
        raise MapPruneError(f"{out} is not empty and holds no defense result; move it away or pass --name NAME to "
                            "write the result under another name")


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass  # not empty, or already gone


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
    if name is not None:
        check_variant_name(name)
    r = load_run(run, data_dir)
    ds_name = r.dataset.name
    default_ratio = DEFAULT_CLEAN_RATIO.get(ds_name, 0.1)
    ratio = clean_ratio if clean_ratio is not None else default_ratio
    kw = {k: v for k, v in kw.items() if v is not None}
    cls = defense_class(defense)
    if name is None:  # from what the user chose, before per-dataset defaults
        name = cls.variant_name({k: v for k, v in kw.items() if k != "seed"})
        if ratio != default_ratio:  # another clean share is another variant: ft-ratio0.05
            name += f"-ratio{ratio:g}"
        if kw.get("seed"):
            name += f"-seed{kw['seed']}"
    for k, v in cls.dataset_defaults.get(ds_name, {}).items():
        kw.setdefault(k, v)
    out = Path(run) / "defense" / name
    _check_defense_folder(out, overwrite)
    seed = kw.get("seed", 0)
    idx = clean_subset(r.dataset.y_train, ratio, seed)
    x, y = r.dataset.x_train[idx], r.dataset.y_train[idx]  # clean originals: the defender never sees poison
    kw.setdefault("hflip", r.dataset.hflip)
    d = create_defense(defense, device=device, progress=progress, **kw)  # refuses bad options before any folder
    writer = RunWriter(out, overwrite, marker="result.json")
    try:
        found = adopt_from and find_result(adopt_from, defense, d.params(), ratio, seed)
        if found:
            return adopt_result(found, writer, run)
        if adopt_only:
            raise NothingToAdopt(f"no finished {defense} result with these settings under {adopt_from}")
        dev = pick_device(device)
        test_sets = r.test_sets()
        before = evaluate(r.model.to(dev), test_sets)
        result = d.repair(r.model, x, y)
        detect_only = kw.get("detect_only", False)
        after = before if detect_only else evaluate(result.model, test_sets)
        report = {
            "schema_version": RESULT_VERSION,
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
        save_defense_figures(writer.partial, r.manifest, report, result, d.split(x, y), d)
        write_json(writer.path("result.json"), report)
        writer.finish()
    except BaseException:
        writer.discard_if_empty()  # a defense that failed before writing anything leaves no ".partial" folder
        _remove_if_empty(out.parent)
        raise
    return report

