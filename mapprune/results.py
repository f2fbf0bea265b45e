"""One results pipeline for ``mapprune report`` and ``mapprune bench``: each column of a row is read from a run's
manifest or a defense's result.json by one function here (:func:`model_row`, :func:`defense_row`), rows are grouped
over seeds by one function (:func:`summarise`: mean, sample sd, range), and means over attacks are taken by one
function (:func:`mean_over`) that says over how many attacks a mean is when some are missing. The report reads run
folders a user names; the bench reads the cells of its grid, and names rows by the grid's labels."""

import re
import statistics
import warnings
from pathlib import Path

from .errors import MapPruneError, MapPruneWarning
from .runs import read_manifest, read_result

METRICS = ("acc", "asr", "ra")


def format_table(rows: list[dict], columns: list[str]) -> str:
    """A plain-text table; floats in [0, 1] under metric columns are shown as percentages."""
    def cell(k, v):
        if isinstance(v, float) and k in ("acc", "asr", "ra", "der", "ACC", "ASR", "RA", "DER"):
            return f"{100 * v:.2f}"
        if isinstance(v, float):
            return f"{v:.1f}"
        return str(v)

    cells = [[cell(c, r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(row, widths))) for row in cells]
    return "\n".join(lines)


def training_seconds(timings: dict) -> float:
    """A model's training time. ``train_s`` is the last process's training (with its evaluations); the pieces of a
    resumed run before its last resume are only in ``train_epochs_s`` (epochs without evaluations), so the larger
    of the two is the run's training time. An imported run trained elsewhere has only its import's ``total_s``."""
    return max(timings.get("train_s", timings.get("total_s", 0.0)), timings.get("train_epochs_s", 0.0))


def model_row(manifest: dict) -> dict:
    """The row of an undefended model (its defense is "none")."""
    m = manifest
    return {"attack": m["attack"]["name"], "dataset": m["dataset"]["name"], "defense": "none", "variant": "none",
            "seed": None, **{k: m["metrics"][k] for k in METRICS}, "triggers": m["metrics"].get("triggers") or {},
            **{f"{k}_before": None for k in METRICS}, "der": None, "pruned": 0,
            "wall_s": training_seconds(m["timings"]), "timings": m["timings"],
            "peak_memory_mb": m.get("peak_memory_mb"), "recipe": None, "suspected_target": None,
            "stimulated_target": None}


def defense_row(result: dict, *, attack: str, dataset: str | None) -> dict:
    """The row of one defense result on a model of ``attack`` and ``dataset``. Its ``variant`` is the result's name without the
    ``-seedN`` suffix of its own seed, so the seeds of one variant (folders NAME, NAME-seedN) group together."""
    seed = result["clean_subset"]["seed"]
    name = result["name"]
    variant = re.sub(rf"-seed{seed}$", "", name) if seed else name
    return {"attack": attack, "dataset": dataset, "defense": name,
            "variant": variant, "seed": seed, **{k: result["after"][k] for k in METRICS},
            "triggers": result["after"].get("triggers") or {},
            **{f"{k}_before": result["before"][k] for k in METRICS}, "der": result["der"],
            "pruned": result["num_pruned"], "wall_s": result["wall_s"], "timings": result["timings"],
            "peak_memory_mb": result.get("peak_memory_mb"), "recipe": result.get("recipe"),
            "suspected_target": result.get("suspected_target"),
            "stimulated_target": result.get("stimulated_target")}


def collect_rows(runs) -> list[dict]:
    """One row per run folder (the undefended model) and per defense result inside it, each with the run's folder
    name as ``run``. A damaged result.json is left out with a :class:`MapPruneWarning` naming it, so one bad file
    does not hide every other row."""
    rows = []
    for run in map(Path, runs):
        manifest = read_manifest(run)
        rows.append({"run": run.name, **model_row(manifest)})
        for res in sorted((run / "defense").glob("*/result.json")):
            try:
                result = read_result(res.parent)
            except MapPruneError as e:
                warnings.warn(f"left out of the report: {e}", MapPruneWarning, stacklevel=2)
                continue
            rows.append({"run": run.name, **defense_row(result, attack=manifest["attack"]["name"],
                                                        dataset=manifest["dataset"]["name"])})
    return rows


def spread(values: list[float]) -> dict:
    """Mean, sample standard deviation (None for one value: no spread claimed), min and max."""
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else None,
            "min": min(values), "max": max(values)}


def summarise(rows: list[dict], by: tuple[str, ...]) -> dict[tuple, dict]:
    """Rows grouped by the fields ``by`` (a defense variant's seeds fall in one group), in the order each group's
    first row appears: {key: {"n", "seeds", "diverged" (how many seeds' fine-tunes diverged), "acc"/"asr"/"ra":
    :func:`spread`}}."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in by), []).append(r)
    return {key: {"n": len(members), "seeds": [m.get("seed") for m in members],
                  "diverged": sum(bool(m.get("diverged")) for m in members),
                  **{k: spread([m[k] for m in members]) for k in METRICS}}
            for key, members in groups.items()}


def mean_over(cells: list[dict | None], metric: str) -> tuple[float | None, str]:
    """The mean of a metric's seed means over the cells present (one cell per attack, None where missing), and
    the note that goes beside it: "" when every attack has the cell, else "(k of n)"."""
    present = [c for c in cells if c is not None]
    if not present:
        return None, ""
    note = "" if len(present) == len(cells) else f" ({len(present)} of {len(cells)})"
    return statistics.fmean(c[metric]["mean"] for c in present), note


def seed_summary(rows: list[dict]) -> list[dict]:
    """The report's groups: one per run and defense variant, with its seeds and each metric's :func:`spread`."""
    return [{"run": run, "attack": attack, "dataset": dataset, "defense": variant, "seeds": s["seeds"],
             **{k: s[k] for k in METRICS}}
            for (run, attack, dataset, variant), s in summarise(rows, ("run", "attack", "dataset", "variant")).items()]


def markdown_seed_table(groups: list[dict]) -> str:
    """Mean +- sample sd over seeds, in percent; ASR with its range."""
    lines = ["| run | attack | defense | seeds | ACC % | ASR % | ASR range % | RA % |", "|" + "---|" * 8]
    for g in groups:
        seeds = ", ".join("-" if s is None else str(s) for s in g["seeds"])
        wide = "" if len(g["seeds"]) < 2 else f"{100 * g['asr']['min']:.2f}-{100 * g['asr']['max']:.2f}"
        lines.append(f"| {g['run']} | {g['attack']} | {g['defense']} | {seeds} | {pm(g['acc'])} | {pm(g['asr'])} | "
                     f"{wide} | {pm(g['ra'])} |")
    return "\n".join(lines)


def pm(s: dict) -> str:
    """A :func:`spread` as "mean ± sd" in percent (the mean alone for one value)."""
    return f"{100 * s['mean']:.2f}" + ("" if s["sd"] is None else f" ± {100 * s['sd']:.2f}")


def markdown_table(rows: list[dict]) -> str:
    """One line per row: the run, its defense and recipe, ACC / ASR / RA / DER, maps pruned, the targets FMT
    suspected, and the wall time."""
    head = ("| run | attack | defense | recipe | ACC % | ASR % | RA % | DER % | maps pruned | suspected target "
            "(anomaly) | stimulated target (anomaly) | wall s |")
    lines = [head, "|" + "---|" * 12]

    def target(t):
        return "" if not t else f"{t['target']} ({t['anomaly_index']:.1f})"

    def pct(v):
        return "-" if v is None else f"{100 * v:.2f}"

    for r in rows:
        der = "" if r["der"] is None else f"{100 * r['der']:.2f}"
        lines.append(f"| {r['run']} | {r['attack']} | {r['defense']} | {r.get('recipe') or ''} | {pct(r['acc'])} | "
                     f"{pct(r['asr'])} | {pct(r['ra'])} | {der} | {r['pruned']} | "
                     f"{target(r.get('suspected_target'))} | {target(r.get('stimulated_target'))} | "
                     f"{r['wall_s']:.0f} |")
    return "\n".join(lines)


def comparison_table(groups: list[dict], defenses: list[str] | None = None) -> str:
    """The paper's layout from :func:`seed_summary` groups: one row per run (attack), one column per defense
    variant, each cell ACC / ASR / RA in % (means over seeds; the seed count in brackets when more than one),
    then the mean over the runs (:func:`mean_over`: "(k of n)" where a column misses some)."""
    runs = list(dict.fromkeys((g["run"], g["attack"]) for g in groups))
    present = list(dict.fromkeys(g["defense"] for g in groups))
    if defenses is None:
        first = [d for d in ("none", "ft", "fmt") if d in present]
        defenses = first + sorted(d for d in present if d not in first)
    cell = {(g["run"], g["defense"]): g for g in groups}
    lines = ["| attack (run) | " + " | ".join(defenses) + " |", "|" + "---|" * (len(defenses) + 1),
             "| | " + " | ".join(["ACC / ASR / RA"] * len(defenses)) + " |"]

    def fmt(g):
        n = len(g["seeds"])
        return (f"{100 * g['acc']['mean']:.1f} / **{100 * g['asr']['mean']:.1f}** / {100 * g['ra']['mean']:.1f}"
                + (f" ({n})" if n > 1 else ""))
    for run, attack in runs:
        cells = [fmt(cell[(run, d)]) if (run, d) in cell else "-" for d in defenses]
        lines.append(f"| {attack} ({run}) | " + " | ".join(cells) + " |")
    if len(runs) > 1:
        means = []
        for d in defenses:
            column = [cell.get((r, d)) for r, _ in runs]
            values = [mean_over(column, k) for k in METRICS]
            means.append(" / ".join(f"{100 * v:.1f}" for v, _ in values) + values[0][1] if values[0][0] is not None
                         else "-")
        lines.append(f"| mean of {len(runs)} | " + " | ".join(means) + " |")
    return "\n".join(lines)
