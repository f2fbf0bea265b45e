"""The bench's results: one row per finished cell (read back from its run or defense folder), written as
DIR/results.csv, DIR/table.md and DIR/figures/."""

import csv
import io
import json
import warnings
from pathlib import Path

from ..errors import MapPruneWarning
from ..runs import atomic_write_text
from .figures import grid_figures, sweep_figure
from .grid import Grid
from .plan import Cell
from .tables import markdown, sweep_markdown


def _triggers(metrics: dict) -> str:
    """A several-trigger model's ASR and RA per trigger, as JSON ({label: {"asr", "ra"}}); "" for one trigger."""
    return json.dumps(metrics["triggers"]) if metrics.get("triggers") else ""


def collect(cells: list[Cell]) -> list[dict]:
    """One row per finished cell: settings, metrics before and after (and per trigger where a model has several),
    DER, wall time per phase, peak memory. A damaged cell (files that do not verify, or lack a field) is left out
    with a warning naming its file."""
    rows = []
    for c in cells:
        obj, problem = c.verify()
        if obj is None:
            if problem:
                warnings.warn(f"{problem}: {c.label} is left out of the results (rerun the bench to redo it)",
                              MapPruneWarning, stacklevel=2)
            continue
        try:
            rows.append(_row(c, obj))
        except (KeyError, TypeError, ValueError) as e:
            warnings.warn(f"{c.marker()} lacks an expected field or value ({type(e).__name__}: {e}): {c.label} is "
                          "left out of the results", MapPruneWarning, stacklevel=2)
    return rows


def _row(c: Cell, obj: dict) -> dict:
    """The results row of a finished cell, from its manifest.json (model) or result.json (defense)."""
    if c.kind == "model":
        m = obj
        return {"attack": c.attack, "defense": "none", "seed": None, "key": c.key, "path": c.path,
                "acc": m["metrics"]["acc"], "asr": m["metrics"]["asr"], "ra": m["metrics"]["ra"],
                "triggers": _triggers(m["metrics"]),
                "acc_before": None, "asr_before": None, "ra_before": None, "der": None,
                "wall_s": m["timings"].get("train_s"), "timings": json.dumps(m["timings"]),
                "peak_memory_mb": m.get("peak_memory_mb"), "settings": json.dumps(c.settings),
                "adopted_from": c.settings.get("source"), "diverged": None}
    r = obj
    return {"attack": c.attack, "defense": c.defense, "seed": c.seed, "key": c.key, "path": c.path,
            "acc": r["after"]["acc"], "asr": r["after"]["asr"], "ra": r["after"]["ra"],
            "triggers": _triggers(r["after"]),
            "acc_before": r["before"]["acc"], "asr_before": r["before"]["asr"],
            "ra_before": r["before"]["ra"], "der": r["der"], "wall_s": r["wall_s"],
            "timings": json.dumps(r["timings"]), "peak_memory_mb": r.get("peak_memory_mb"),
            "settings": json.dumps({**c.settings, "params": r["params"]}),
            "adopted_from": r.get("adopted_from"), "diverged": diverged_epoch(r)}


def diverged_epoch(result: dict) -> int | None:
    """The epoch where a fine-tuning defense's loss peaked, when its fine-tune diverged
    (:func:`~mapprune.defenses.base.loss_divergence`, read from the saved history, so results saved before the
    check existed are judged too); None otherwise."""
    from ..defenses import FineTuning, defense_class
    from ..defenses.base import loss_divergence

    if not issubclass(defense_class(result["defense"]), FineTuning):
        return None
    d = loss_divergence(result.get("history") or [])
    return d["peak_epoch"] if d else None


def write_results(cells: list[Cell], grid: Grid, out: Path) -> None:
    """results.csv, table.md and figures/ of the finished cells, each file written atomically (a crash or a full
    disk leaves the previous complete file)."""
    rows = collect(cells)
    if not rows:
        return
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(out / "results.csv", buf.getvalue())
    text = markdown(rows, f"{grid.name}: {grid.dataset}", grid.reference)
    if grid.sweeps:
        text += "\n" + sweep_markdown(rows, grid.sweeps)
    atomic_write_text(out / "table.md", text)
    grid_figures(rows, out / "figures")
    for sw in grid.sweeps:
        sweep_figure(rows, sw, out / "figures")
