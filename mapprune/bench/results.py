"""The bench's results: one row per finished cell (read back from its run or defense folder), written as
DIR/results.csv, DIR/table.md and DIR/figures/."""

import csv
import io
import json
import warnings
from pathlib import Path

from ..defenses import FineTuning, defense_class
from ..defenses.base import loss_divergence
from ..errors import MapPruneError, MapPruneWarning
from ..results import defense_row, model_row
from ..runs import atomic_write_text
from .figures import grid_figures, sweep_figure
from .grid import Grid
from .plan import MEASUREMENTS, Cell
from .tables import detection_markdown, markdown, sweep_markdown


def collect(cells: list[Cell]) -> list[dict]:
    """One row per finished cell: settings, metrics before and after (and per trigger where a model has several),
    DER, wall time per phase, peak memory. A damaged cell (files that do not verify, or lack a field) is left out
    with a warning naming its file."""
    relapses = {c.path: obj for c in cells if c.kind == "relapse" for obj in [c.verify()[0]] if obj is not None}
    rows = []
    for c in cells:
        if c.kind in MEASUREMENTS:  # relapse figures join their model's or defense's row; detection has its own
            continue
        obj, problem = c.verify()
        if obj is None:
            if problem:
                warnings.warn(f"{problem}: {c.label} is left out of the results (rerun the bench to redo it)",
                              MapPruneWarning, stacklevel=2)
            continue
        try:
            rows.append({**_row(c, obj), **relapse_columns(relapses.get(c.path))})
        except (KeyError, TypeError, ValueError, MapPruneError) as e:
            warnings.warn(f"{c.marker()} lacks an expected field or value ({type(e).__name__}: {e}): {c.label} is "
                          "left out of the results", MapPruneWarning, stacklevel=2)
    return rows


# results.csv's columns, in order; dict-valued ones are written as JSON
COLUMNS = ("attack", "defense", "seed", "key", "path", "acc", "asr", "ra", "triggers", "acc_before", "asr_before",
           "ra_before", "der", "wall_s", "timings", "peak_memory_mb", "settings", "adopted_from", "diverged",
           "relapse_asr", "reactivated_asr", "control_relapse_asr", "control_reactivated_asr")
# [relapse] grids: the mean ASR over the retuning seeds after retuning, and after the reactivation perturbation,
# of the row's model and of the clean control (empty without relapse)
RELAPSE_COLUMNS = COLUMNS[-4:]


def relapse_columns(report: dict | None) -> dict:
    """The relapse columns of a row from its relapse.json (empty strings when there is none)."""
    if report is None:
        return dict.fromkeys(RELAPSE_COLUMNS, "")
    own = next(m for name, m in report["models"].items() if name != "control")
    control = report["models"].get("control") or {}
    return {"relapse_asr": own["asr_after_mean"], "reactivated_asr": own.get("reactivation_asr_mean", ""),
            "control_relapse_asr": control.get("asr_after_mean", ""),
            "control_reactivated_asr": control.get("reactivation_asr_mean", "")}


def read_results(path) -> list[dict]:
    """The rows of a bench's results.csv (``path``: the file, or the bench folder holding it) as the bench wrote
    them, numbers read back as numbers: ACC / ASR / RA and their ``_before`` values and DER as floats, ``seed`` and
    ``diverged`` as ints (None where empty). A missing file, or one without results.csv's columns, is a
    :class:`MapPruneError` naming it."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.csv"
    if not path.is_file():
        raise MapPruneError(f"no results file {path} (a bench folder has one once a cell is done)")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        lacking = [c for c in ("attack", "defense", "seed", "acc", "asr", "ra") if c not in (reader.fieldnames or [])]
        if lacking:
            raise MapPruneError(f"{path} is not a bench's results.csv: it lacks the column(s) {', '.join(lacking)}")
        raw = list(reader)
    floats = ("acc", "asr", "ra", "acc_before", "asr_before", "ra_before", "der", *RELAPSE_COLUMNS)
    rows = []
    for i, r in enumerate(raw, 2):
        try:
            rows.append({**r, **{k: float(r[k]) if r.get(k) else None for k in floats if k in r},
                         **{k: int(r[k]) if r.get(k) else None for k in ("seed", "diverged") if k in r}})
        except ValueError as e:
            raise MapPruneError(f"{path}, line {i}: a number that does not read as one ({e})") from None
        if None in (rows[-1]["acc"], rows[-1]["asr"], rows[-1]["ra"]):
            raise MapPruneError(f"{path}, line {i}: no ACC, ASR or RA")
    return rows


def _row(c: Cell, obj: dict) -> dict:
    """The results row of a finished cell, from its manifest.json (model) or result.json (defense), by the columns'
    one definition (:mod:`mapprune.results`), named by the grid's labels."""
    if c.kind == "model":
        row = model_row(obj)
        extra = {"settings": c.settings, "adopted_from": c.settings.get("source"), "diverged": None}
    else:
        row = defense_row(obj, attack=c.attack, dataset=None)  # the grid's label; results.csv has no dataset
        extra = {"settings": {**c.settings, "params": obj["params"]}, "adopted_from": obj.get("adopted_from"),
                 "diverged": diverged_epoch(obj)}
    row.update(attack=c.attack, defense=c.defense or "none", seed=c.seed, key=c.key, path=c.path, **extra)
    return {k: (json.dumps(row[k]) if isinstance(row[k], dict) else row[k]) if k != "triggers" else
            (json.dumps(row[k]) if row[k] else "") for k in COLUMNS if k not in RELAPSE_COLUMNS}


def diverged_epoch(result: dict) -> int | None:
    """The epoch where a fine-tuning defense's loss peaked, when its fine-tune diverged
    (:func:`~mapprune.defenses.base.loss_divergence`, read from the saved history, so results saved before the
    check existed are judged too); None otherwise."""
    if not issubclass(defense_class(result["defense"]), FineTuning):
        return None
    d = loss_divergence(result.get("history") or [])
    return d["peak_epoch"] if d else None


DETECTION_COLUMNS = ("attack", "kind", "detector", "auroc", "auroc_part", "tpr", "fpr", "rule", "path")


def detection_rows(cells: list[Cell]) -> list[dict]:
    """One row per detector of every finished cleanse and guard cell: AUROC, the part AUROC (cleanse: inside the
    target class; guard: on the effective images), TPR and FPR at the detector's own flagging rule."""
    rows = []
    for c in cells:
        if c.kind not in ("cleanse", "guard"):
            continue
        obj, _ = c.verify()
        if obj is None:
            continue
        for name, r in obj["detectors"].items():
            if c.kind == "cleanse":
                ev = r["evaluation"]
                at = ev["rules"].get(r["rule"], {})
                row = {"auroc": ev["auroc"], "auroc_part": ev.get("auroc_target"), "tpr": at.get("tpr"),
                       "fpr": at.get("fpr"), "rule": r["rule"]}
            else:
                row = {"auroc": r["all"]["auroc"], "auroc_part": r["effective"]["auroc"], "tpr": r["all"]["tpr"],
                       "fpr": r["all"]["fpr"], "rule": "calibrated"}
            rows.append({"attack": c.attack, "kind": c.kind, "detector": name, **row, "path": c.path})
    return rows


def write_results(cells: list[Cell], grid: Grid, out: Path) -> None:
    """results.csv, table.md and figures/ of the finished cells, each file written atomically (a crash or a full
    disk leaves the previous complete file)."""
    rows = collect(cells)
    if not rows:
        return
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=list(COLUMNS))
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(out / "results.csv", buf.getvalue())
    detected = detection_rows(cells)
    if detected:
        buf = io.StringIO(newline="")
        w = csv.DictWriter(buf, fieldnames=list(DETECTION_COLUMNS))
        w.writeheader()
        w.writerows(detected)
        atomic_write_text(out / "detection.csv", buf.getvalue())
    text = markdown(rows, f"{grid.name}: {grid.dataset}", grid.reference) + detection_markdown(detected)
    if grid.sweeps:
        text += "\n" + sweep_markdown(rows, grid.sweeps)
    atomic_write_text(out / "table.md", text)
    grid_figures(rows, out / "figures")
    for sw in grid.sweeps:
        sweep_figure(rows, sw, out / "figures")
