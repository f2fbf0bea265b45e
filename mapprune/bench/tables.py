"""The bench's tables (table.md): results rows summarised per attack and defense (mean ± sd over seeds), as
markdown tables of ASR / RA and clean ACC, per trigger, beside published numbers, and per swept option."""

import json
import statistics

from .. import results
from ..defenses.base import DIVERGENCE_FACTOR
from .grid import Sweep


def summarise(rows: list[dict]) -> dict:
    """{(attack, defense): the cell's seeds summarised (:func:`mapprune.results.summarise`)}."""
    return results.summarise(rows, ("attack", "defense"))


def markdown(rows: list[dict], title: str, reference: dict | None = None) -> str:
    """Attacks as rows, defenses as columns: ASR / RA (mean ± sd over seeds), then ACC, each with the mean over
    attacks as the last row; each trigger of a several-trigger model; with a ``reference`` (load_reference), the
    same tables of its published numbers."""
    summary = summarise(rows)
    attacks = list(dict.fromkeys(r["attack"] for r in rows))
    defenses = list(dict.fromkeys(r["defense"] for r in rows))
    parts = [f"# {title}", "", *_tables(summary, attacks, defenses, "(mean ± sd over defense seeds)"),
             *_trigger_table(rows, defenses), *relapse_table(rows, attacks, defenses)]
    if any(s["diverged"] for s in summary.values()):
        parts += [f"† the defense's fine-tune diverged (an epoch's loss over {DIVERGENCE_FACTOR:g}x the first's; "
                  "results.csv: `diverged`, the epoch of the peak) in at least one seed: it relearnt much of the model "
                  "from the clean subset, so what it removed may not be the defense's doing; a lower lr (`opts = {lr = "
                  "0.001}`) tells.", ""]
    if reference:
        published = published_cells(reference)
        cols = [d for d in defenses if any((a, d) in published for a in attacks)]
        if cols:
            parts += [f"# Published: {reference['name']}", "",
                      "The same cells as published (`-`: not published); averages over the published cells.", "",
                      *_tables(published, attacks, cols, "(published)")]
    return "\n".join(parts)


def _relapse_value(r: dict, key: str) -> float | None:
    v = r.get(key)
    return None if v in (None, "") else float(v)


def relapse_table(rows: list[dict], attacks: list[str], defenses: list[str], names: dict | None = None) -> list[str]:
    """Of a grid with [relapse]: per attack and defense, the ASR after retuning / after the reactivation
    perturbation (means over defense seeds of the means over retuning seeds), and the clean control's beside them
    ("-": not measured). Empty when no row has relapse figures."""
    per: dict = {}
    for r in rows:
        own = _relapse_value(r, "relapse_asr")
        if own is not None:
            per.setdefault((r["attack"], r["defense"]), []).append(
                (own, _relapse_value(r, "reactivated_asr"), _relapse_value(r, "control_relapse_asr"),
                 _relapse_value(r, "control_reactivated_asr")))
    if not per:
        return []
    names = names or {}

    def pct(values):
        values = [v for v in values if v is not None]
        return f"{100 * statistics.fmean(values):.2f}" if values else "-"

    cols = [d for d in defenses if any((a, d) in per for a in attacks)]
    parts = ["## ASR % after retuning / after reactivation (relapse; mean over seeds)", "",
             "| attack | " + " | ".join(names.get(d, d) for d in cols) + " | clean control |",
             "|" + "---|" * (len(cols) + 2)]
    for a in attacks:
        if not any((a, d) in per for d in cols):
            continue
        cells = [f"{pct(v[0] for v in per[(a, d)])} / {pct(v[1] for v in per[(a, d)])}" if (a, d) in per else "-"
                 for d in cols]
        control = [v for d in cols for v in per.get((a, d), [])]
        parts.append(f"| {names.get(a, a)} | " + " | ".join(cells) +
                     f" | {pct(v[2] for v in control)} / {pct(v[3] for v in control)} |")
    return parts + [""]


def detection_markdown(rows: list[dict]) -> str:
    """Tables of the cleanse and guard cells' detection rows (:func:`mapprune.bench.results.detection_rows`):
    attacks as rows, detectors as columns, "AUROC / TPR / FPR" (the last two at each detector's own rule), the
    mean AUROC over the attacks as the last row. Empty when there are none."""
    titles = {"cleanse": "Poisoned training images found (cleanse): AUROC / TPR % / FPR % at the detector's rule",
              "guard": "Triggered inputs flagged (guard): AUROC / TPR % / FPR % at the calibrated threshold"}
    parts = []
    for kind, title in titles.items():
        mine = [r for r in rows if r["kind"] == kind]
        if not mine:
            continue
        attacks = list(dict.fromkeys(r["attack"] for r in mine))
        detectors = list(dict.fromkeys(r["detector"] for r in mine))
        cell = {(r["attack"], r["detector"]): r for r in mine}

        def show(r, key, scale=1.0, digits=3):
            v = r.get(key)
            return "-" if v in (None, "") else f"{scale * float(v):.{digits}f}"

        parts += ["", f"## {title}", "", "| attack | " + " | ".join(detectors) + " |", "|" + "---|" * (len(detectors) + 1)]
        for a in attacks:
            parts.append(f"| {a} | " + " | ".join(
                f"{show(cell[(a, d)], 'auroc')} / {show(cell[(a, d)], 'tpr', 100, 1)} / {show(cell[(a, d)], 'fpr', 100, 1)}"
                if (a, d) in cell else "-" for d in detectors) + " |")
        means = []
        for d in detectors:
            values = [float(cell[(a, d)]["auroc"]) for a in attacks if (a, d) in cell and cell[(a, d)]["auroc"] not in (None, "")]
            means.append(f"{statistics.fmean(values):.3f}" if values else "-")
        parts.append("| **mean AUROC** | " + " | ".join(means) + " |")
    return "\n".join(parts) + ("\n" if parts else "")


def _trigger_table(rows: list[dict], defenses: list[str]) -> list[str]:
    """For models with several triggers, each trigger's ASR / RA under each defense (mean over seeds): a defense
    judged only on the pooled ASR could remove one trigger and leave another."""
    per: dict = {}
    for r in rows:
        for label, m in (json.loads(r["triggers"]) if r.get("triggers") else {}).items():
            per.setdefault((r["attack"], label), {}).setdefault(r["defense"], []).append(m)
    if not per:
        return []
    parts = ["## ASR % / RA % per trigger (models with several triggers; mean over defense seeds)", "",
             "| attack: trigger | " + " | ".join(defenses) + " |", "|" + "---|" * (len(defenses) + 1)]
    for (attack, label), cells in per.items():
        parts.append(f"| {attack}: {label} | " + " | ".join(
            f"{100 * statistics.fmean(m['asr'] for m in cells[d]):.2f} / "
            f"{100 * statistics.fmean(m['ra'] for m in cells[d]):.2f}" if d in cells else "-"
            for d in defenses) + " |")
    return parts + [""]


def published_cells(reference: dict) -> dict:
    """A reference's published numbers (load_reference) as cells of :func:`summarise`'s shape, one seed each."""
    return {(a, d): {"n": 1, **{m: results.spread([v[i] / 100]) for i, m in enumerate(results.METRICS)}}
            for a, row in reference["cells"].items() for d, v in row.items()}


# The kinds of :func:`grid_table`: what a cell shows, and the metrics of the average row.
GRID_KINDS = {"asr-ra": ("asr", "ra"), "acc": ("acc",)}


def grid_table(summary: dict, attacks: list[str], defenses: list[str], kind: str,
               names: dict[str, str] | None = None) -> list[str]:
    """The lines of one attacks x defenses markdown table of :func:`summarise` cells: ``kind`` "asr-ra" (ASR mean ±
    sd over seeds / RA mean) or "acc" (ACC mean ± sd), † where a seed's fine-tune diverged, "-" where a cell is
    missing, and the **average** row over the attacks (:func:`mapprune.results.mean_over`, "(k of n)" where a
    column misses some). ``names`` shows a label under another name (rows and header only)."""
    names = names or {}

    def mark(s):
        return " †" if s.get("diverged") else ""

    if kind == "asr-ra":
        def cell(s):
            return f"{results.pm(s['asr'])} / {100 * s['ra']['mean']:.2f}{mark(s)}"
    else:
        def cell(s):
            return results.pm(s["acc"]) + mark(s)
    lines = ["| attack | " + " | ".join(names.get(d, d) for d in defenses) + " |", "|" + "---|" * (len(defenses) + 1)]
    for a in attacks:
        lines.append(f"| {names.get(a, a)} | " + " | ".join(cell(summary[(a, d)]) if (a, d) in summary else "-"
                                                           for d in defenses) + " |")
    avg = []
    for d in defenses:
        column = [summary.get((a, d)) for a in attacks]
        means = [results.mean_over(column, m) for m in GRID_KINDS[kind]]
        avg.append("-" if means[0][0] is None else " / ".join(f"{100 * v:.2f}" for v, _ in means) + means[0][1])
    return lines + ["| **average** | " + " | ".join(avg) + " |"]


def _tables(summary: dict, attacks: list[str], defenses: list[str], caption: str) -> list[str]:
    parts = []
    for what, kind in (("ASR % / RA %", "asr-ra"), ("clean ACC %", "acc")):
        parts += [f"## {what} {caption}", "", *grid_table(summary, attacks, defenses, kind), ""]
    return parts


def cells_table(summary: dict, attacks: list[str], defenses: list[str], names: dict[str, str] | None = None
                ) -> list[str]:
    """The lines of an attacks x defenses markdown table whose cells are ACC / ASR / RA in % (means over seeds;
    "(n seeds)" where more than one, † where a seed's fine-tune diverged, "-" where missing); no average row."""
    names = names or {}

    def cell(s):
        seeds = f" ({s['n']} seeds)" if s["n"] > 1 else ""
        return (" / ".join(f"{100 * s[m]['mean']:.2f}" for m in results.METRICS) + seeds
                + (" †" if s.get("diverged") else ""))
    lines = ["| attack | " + " | ".join(names.get(d, d) for d in defenses) + " |", "|" + "---|" * (len(defenses) + 1)]
    for a in attacks:
        lines.append(f"| {names.get(a, a)} | " + " | ".join(cell(summary[(a, d)]) if (a, d) in summary else "-"
                                                           for d in defenses) + " |")
    return lines


def means_table(summary: dict, attacks: list[str], defenses: list[str], reference: dict | None = None,
                names: dict[str, str] | None = None) -> tuple[list[str], dict]:
    """Each defense's mean ACC / ASR / RA over ``attacks`` (seeds averaged within a cell first, then the cells over
    the attacks: :func:`mapprune.results.mean_over`); with a ``reference`` (load_reference), a column of its
    published means over the same attacks ("-" unless it has every one of them). A defense missing a cell on one
    of the attacks gets no mean: its row names the attacks it lacks, so every mean is over the same models.
    (lines, {defense: {metric: mean}})."""
    names = names or {}
    extra = "" if reference is None else " published ACC / ASR / RA |"
    lines = ["| defense | ACC | ASR | RA |" + extra, "|---|---|---|---|" + ("---|" if extra else "")]
    means = {}
    for d in defenses:
        column = [summary.get((a, d)) for a in attacks]
        pub = ""
        if reference is not None:
            published = [reference["cells"].get(a, {}).get(d) for a in attacks]
            pub = (" - |" if None in published else  # percentages as written in the reference
                   " " + " / ".join(f"{statistics.fmean(p[i] for p in published):.2f}" for i in range(3)) + " |")
        missing = [a for a, c in zip(attacks, column) if c is None]
        if missing:
            lines.append(f"| {names.get(d, d)} | missing {', '.join(missing)} | | |{pub}")
            continue
        means[d] = {m: results.mean_over(column, m)[0] for m in results.METRICS}
        lines.append(f"| {names.get(d, d)} | " + " | ".join(f"{100 * v:.2f}" for v in means[d].values()) + f" |{pub}")
    return lines, means


def seeds_table(rows: list[dict], defense: str, attacks: list[str], names: dict[str, str] | None = None
                ) -> list[str]:
    """The lines of a markdown table of one defense seed by seed: per attack, ACC / ASR / RA of each seed ("-"
    where a seed is missing), the mean ASR over its seeds, and the mean change of clean ACC from the undefended
    model (``acc_before``)."""
    names = names or {}
    mine = [r for r in rows if r["defense"] == defense]
    seeds = sorted({int(r["seed"]) for r in mine})
    summary = summarise(mine)
    lines = ["| attack | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ASR | mean ΔACC |",
             "|" + "---|" * (len(seeds) + 3)]
    for a in attacks:
        by_seed = {int(r["seed"]): r for r in mine if r["attack"] == a}
        if not by_seed:
            lines.append(f"| {names.get(a, a)} | " + " | ".join("-" for _ in seeds) + " | - | - |")
            continue
        s = summary[(a, defense)]
        before = results.spread([float(r["acc_before"]) for r in by_seed.values()])["mean"]
        cells = [" / ".join(f"{100 * float(by_seed[k][m]):.2f}" for m in results.METRICS) if k in by_seed else "-"
                 for k in seeds]
        lines.append(f"| {names.get(a, a)} | " + " | ".join(cells)
                     + f" | {100 * s['asr']['mean']:.2f} | {100 * (s['acc']['mean'] - before):+.2f} |")
    return lines


def sweep_points(rows: list[dict], sweep: Sweep) -> tuple[list, list[str], dict]:
    """(values, attacks, {(value, attack): summary}) of one swept option, over the cells that are done."""
    summary = summarise(rows)
    attacks = list(dict.fromkeys(r["attack"] for r in rows))
    got = {(str(v), a): summary[(a, label)] for v, label in sweep.points for a in attacks
           if (a, label) in summary}
    return [v for v, _ in sweep.points], attacks, got


def sweep_markdown(rows: list[dict], sweeps: list[Sweep]) -> str:
    """Per swept option: its values as rows, each attack's ASR and ACC as columns (the entry's own value marked)."""
    parts = ["## Sensitivity (one option changed at a time; * = the entry's own setting)", ""]
    for sw in sweeps:
        values, attacks, got = sweep_points(rows, sw)
        parts += [f"### {sw.defense}: {sw.param}", "",
                  f"| {sw.param} | " + " | ".join(f"{a} ASR / ACC %" for a in attacks) + " |",
                  "|" + "---|" * (len(attacks) + 1)]
        for i, v in enumerate(values):
            cells = [f"{100 * got[(str(v), a)]['asr']['mean']:.2f} / {100 * got[(str(v), a)]['acc']['mean']:.2f}"
                     if (str(v), a) in got else "-" for a in attacks]
            parts.append(f"| {value_text(v)}{'*' if sw.points[i][1] == sw.defense else ''} | "
                         + " | ".join(cells) + " |")
        parts.append("")
    return "\n".join(parts)


def value_text(v) -> str:
    """A swept value as printed; an option whose own setting is None (the defense decides, e.g. FMT's budget from
    its rank rule) reads "default"."""
    return "default" if v is None else str(v)
