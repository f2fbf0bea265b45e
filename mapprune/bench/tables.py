"""The bench's tables (table.md): results rows summarised per attack and defense (mean ± sd over seeds), as
markdown tables of ASR / RA and clean ACC, per trigger, beside published numbers, and per swept option."""

import json
import statistics

from .grid import Sweep


def summarise(rows: list[dict]) -> dict:
    """{(attack, defense): {"n", "acc"/"asr"/"ra": (mean, sd or None)}}."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["attack"], r["defense"]), []).append(r)
    out = {}
    for k, members in groups.items():
        s = {"n": len(members), "diverged": sum(bool(x.get("diverged")) for x in members)}
        for m in ("acc", "asr", "ra"):
            v = [x[m] for x in members]
            s[m] = (statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else None)
        out[k] = s
    return out


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
        published = {(a, d): {"n": 1, **{m: (v[i] / 100, None) for i, m in enumerate(("acc", "asr", "ra"))}}
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
    def pm(v):
        return f"{100 * v[0]:.2f}" + ("" if v[1] is None else f" ± {100 * v[1]:.2f}")

    parts = []

    def mark(s):
        return " †" if s.get("diverged") else ""

    for what, cell in (("ASR % / RA %", lambda s: f"{pm(s['asr'])} / {100 * s['ra'][0]:.2f}{mark(s)}"),
                       ("clean ACC %", lambda s: pm(s["acc"]) + mark(s))):
        parts += [f"## {what} {caption}", "",
                  "| attack | " + " | ".join(defenses) + " |", "|" + "---|" * (len(defenses) + 1)]
        for a in attacks:
            parts.append(f"| {a} | " + " | ".join(cell(summary[(a, d)]) if (a, d) in summary else "-"
                                                  for d in defenses) + " |")
        avg = []
        for d in defenses:
            ss = [summary[(a, d)] for a in attacks if (a, d) in summary]
            if not ss:
                avg.append("-")
                continue
            # A column with missing cells averages over fewer attacks: say over how many.
            part = "" if len(ss) == len(attacks) else f" ({len(ss)} of {len(attacks)})"
            if what.startswith("ASR"):
                avg.append(f"{100 * statistics.fmean(s['asr'][0] for s in ss):.2f} / "
                           f"{100 * statistics.fmean(s['ra'][0] for s in ss):.2f}{part}")
            else:
                avg.append(f"{100 * statistics.fmean(s['acc'][0] for s in ss):.2f}{part}")
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
            cells = [f"{100 * got[(str(v), a)]['asr'][0]:.2f} / {100 * got[(str(v), a)]['acc'][0]:.2f}"
                     if (str(v), a) in got else "-" for a in attacks]
            parts.append(f"| {value_text(v)}{'*' if sw.points[i][1] == sw.defense else ''} | "
                         + " | ".join(cells) + " |")
        parts.append("")
    return "\n".join(parts)


def value_text(v) -> str:
    """A swept value as printed; an option whose own setting is None (the defense decides, e.g. FMT's budget from
    its rank rule) reads "default"."""
    return "default" if v is None else str(v)
