"""The bench's tables (table.md): results rows summarised per attack and defense (mean ± sd over seeds), as
markdown tables of ASR / RA and clean ACC, per trigger, beside published numbers, and per swept option."""

import json
import statistics

from .. import results
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
             *_trigger_table(rows, defenses)]
    if any(s["diverged"] for s in summary.values()):
        from ..defenses.base import DIVERGENCE_FACTOR

        parts += [f"† the defense's fine-tune diverged (an epoch's loss over {DIVERGENCE_FACTOR:g}x the first's; "
                  "results.csv: `diverged`, the epoch of the peak) in at least one seed: it relearnt much of the model "
                  "from the clean subset, so what it removed may not be the defense's doing; a lower lr (`opts = {lr = "
                  "0.001}`) tells.", ""]
    if reference:
        published = {(a, d): {"n": 1, **{m: results.spread([v[i] / 100]) for i, m in enumerate(results.METRICS)}}
                     for a, row in reference["cells"].items() for d, v in row.items()}
        cols = [d for d in defenses if any((a, d) in published for a in attacks)]
        if cols:
            parts += [f"# Published: {reference['name']}", "",
                      "The same cells as published (`-`: not published); averages over the published cells.", "",
                      *_tables(published, attacks, cols, "(published)")]
    return "\n".join(parts)


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


def _tables(summary: dict, attacks: list[str], defenses: list[str], caption: str) -> list[str]:
    def mark(s):
        return " †" if s.get("diverged") else ""

    parts = []
    for what, cell in (("ASR % / RA %", lambda s: f"{results.pm(s['asr'])} / {100 * s['ra']['mean']:.2f}{mark(s)}"),
                       ("clean ACC %", lambda s: results.pm(s["acc"]) + mark(s))):
        parts += [f"## {what} {caption}", "",
                  "| attack | " + " | ".join(defenses) + " |", "|" + "---|" * (len(defenses) + 1)]
        for a in attacks:
            parts.append(f"| {a} | " + " | ".join(cell(summary[(a, d)]) if (a, d) in summary else "-"
                                                  for d in defenses) + " |")
        avg = []
        for d in defenses:
            column = [summary.get((a, d)) for a in attacks]
            metrics = ("asr", "ra") if what.startswith("ASR") else ("acc",)
            means = [results.mean_over(column, m) for m in metrics]
            avg.append("-" if means[0][0] is None else
                       " / ".join(f"{100 * v:.2f}" for v, _ in means) + means[0][1])
        parts += ["| **average** | " + " | ".join(avg) + " |", ""]
    return parts


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
