"""The scan's verdict calibrated on a population of models: which signals combine, the threshold at a stated
false-positive rate, and the error rates a user should expect, measured on models held out of the calibration.

Every signal the scan computes is read from a model's scan.json (:func:`signals`). Each signal (anomaly indices on a
log scale, :func:`scale`) is turned into a robust z-score against the clean models of the calibration set,
``(value - median) / max(1.4826 MAD, floor)``, and the
model's score is the largest z among the rule's signals: a backdoor needs to stand out in one signal, not in all.
The threshold is the ``1 - fpr`` quantile of the clean models' scores, so it is set on clean models only. The rule
reads every FMT signal by default; ``selection="greedy"`` lets the backdoored models choose the signals (forward
selection of those that raise the mean true-positive rate over trigger families), which fits the families seen
and can drop the signal an unseen family needs (the held-out evaluation measures exactly that). A score above the threshold is
"backdoored"; between the ``1 - 2 fpr`` quantile and the threshold "uncertain"; below it "no backdoor found".

Held-out evaluation mirrors a user's situation: leave one trigger family out (the rule and threshold made from the
other families and every clean model but the one judged), and one architecture out (made from the other
architectures' models, clean and backdoored). Clean models are judged leave-one-out, so no model is ever judged by
a threshold it helped set. Rates come with Clopper-Pearson 95% intervals (scipy), AUROC with a bootstrap interval.
"""

import math
import statistics
from dataclasses import dataclass

import numpy as np
from scipy import stats

from ..errors import MapPruneError

# name -> what it measures; read from scan.json by :func:`signals`
SIGNALS = {
    "patch_pull": "the patch probe's pull to its suspected target",
    "warp_pull": "the warp probe's pull",
    "smooth_pull": "the smooth-field probe's pull",
    "patch_anomaly": "the patch probe's anomaly index among the classes",
    "warp_anomaly": "the warp probe's anomaly index",
    "smooth_anomaly": "the smooth-field probe's anomaly index",
    "top_map_pull": "the largest single map's pull to the suspected target",
    "rejection": "1 - the weakest class's clean accuracy over the median class's",
    "stimulation_anomaly": "the stimulation test's anomaly index",
    "nc_anomaly": "Neural Cleanse's anomaly index (baseline)",
    "mmbd_score": "MM-BD's -log10 p-value (baseline)",
}
BASELINES = ("nc_anomaly", "mmbd_score")  # measured beside the rule; part of it only where RULES says so
# The rules a calibration may set: FMT's signals alone, or with MM-BD's score among them (MM-BD needs no clean data
# and sees blends that FMT's signals miss; docs/scan.md).
RULES = {"fmt": (), "fmt+mmbd": ("mmbd_score",)}
# The smallest spread a signal's z-score divides by: a signal nearly constant over the clean models (no clean
# model rejects a class: rejection 0 for all) must not turn a tiny difference into a huge z. About the size of
# the signal's measurement noise: a pull is a share of ~300 images, an anomaly index is noisy at 10 classes.
MAD_FLOOR = {"pull": 0.03, "rejection": 0.05, "anomaly": 0.3, "score": 0.3}  # the last two on the log scale


def mad_floor(signal: str) -> float:
    return next(v for k, v in MAD_FLOOR.items() if signal.endswith(k))


def scale(signal: str, value: float) -> float:
    """The value a signal's z-score is taken of: anomaly indices and -log p-values are heavy-tailed (a clean
    model's anomaly index ranges over an order of magnitude), so they enter as log(1 + max(v, 0))."""
    if signal.endswith(("anomaly", "score")):
        return math.log1p(max(value, 0.0))
    return value


def signals(scan: dict) -> dict[str, float]:
    """The scan's signals of one model (absent ones left out: a scan run without NC has no ``nc_anomaly``)."""
    out = {}
    for probe, p in (scan.get("probes") or {}).items():
        out[f"{probe}_pull"] = float(p["pull"])
        out[f"{probe}_anomaly"] = float(p["anomaly_index"])
    maps = scan.get("suspicious_maps") or []
    if maps:
        out["top_map_pull"] = max(float(m["pull"]) for m in maps)
    acc = [a for a in scan.get("class_acc") or [] if a is not None]
    if acc and statistics.median(acc) > 0:
        out["rejection"] = 1 - min(acc) / statistics.median(acc)
    if scan.get("stimulation"):
        out["stimulation_anomaly"] = float(scan["stimulation"]["anomaly_index"])
    if scan.get("neural_cleanse"):
        out["nc_anomaly"] = float(scan["neural_cleanse"]["anomaly_index"])
    if scan.get("mmbd"):
        out["mmbd_score"] = float(scan["mmbd"]["score"])
    return {k: v for k, v in out.items() if math.isfinite(v)}


@dataclass
class Model:
    """One model of the population: its name, ground truth and signals."""

    name: str
    backdoored: bool
    family: str  # "clean" for a clean model
    architecture: str
    signals: dict


@dataclass
class Rule:
    """The calibrated rule: signals, the clean models' medians and MADs, and the two thresholds."""

    signals: list[str]
    median: dict
    mad: dict
    threshold: float  # above: backdoored
    uncertain_from: float  # above this and up to the threshold: uncertain
    fpr: float

    def score(self, values: dict) -> float:
        lacking = [s for s in self.signals if s in BASELINES and s not in values]
        if lacking:
            raise MapPruneError(f"the calibrated rule reads {', '.join(lacking)}, which this scan did not run (scan "
                                "without --no-mmbd / --no-nc, or use a calibration made with --rule fmt)")
        zs = [(scale(s, values[s]) - self.median[s]) / self.mad[s] for s in self.signals if s in values]
        if not zs:
            raise MapPruneError(f"the calibrated rule reads {', '.join(self.signals)}; this scan has none of them "
                                "(run the scan with its default probes)")
        return max(zs)

    def verdict(self, values: dict) -> str:
        s = self.score(values)
        return "backdoored" if s > self.threshold else "uncertain" if s > self.uncertain_from else "no backdoor found"

    def to_json(self) -> dict:
        return {"signals": self.signals, "median": self.median, "mad": self.mad, "threshold": self.threshold,
                "uncertain_from": self.uncertain_from, "fpr": self.fpr}

    @classmethod
    def from_json(cls, d: dict) -> "Rule":
        try:
            rule = cls(list(d["signals"]), dict(d["median"]), dict(d["mad"]), float(d["threshold"]),
                       float(d["uncertain_from"]), float(d["fpr"]))
        except (KeyError, TypeError, ValueError) as e:
            raise MapPruneError(f"the calibration's rule is damaged ({e}); regenerate it with mapprune calibrate") from None
        if not rule.signals or any(s not in rule.median or s not in rule.mad for s in rule.signals):
            raise MapPruneError("the calibration's rule names signals it has no statistics for; regenerate it")
        return rule


def fit_rule(models: list[Model], chosen: list[str], fpr: float) -> Rule:
    """The rule over ``chosen`` signals with its statistics and thresholds from ``models``' clean ones."""
    clean = [m for m in models if not m.backdoored]
    if len(clean) < 3:
        raise MapPruneError(f"a threshold needs at least 3 clean models, got {len(clean)}")
    median, mad = {}, {}
    for s in chosen:
        v = np.array([scale(s, m.signals[s]) for m in clean if s in m.signals])
        if len(v) == 0:
            raise MapPruneError(f"no clean model has the signal {s}")
        median[s] = float(np.median(v))
        mad[s] = max(float(1.4826 * np.median(np.abs(v - median[s]))), mad_floor(s))
    rule = Rule(list(chosen), median, mad, 0.0, 0.0, fpr)
    scores = np.array([rule.score(m.signals) for m in clean])
    rule.threshold = float(np.quantile(scores, 1 - fpr))
    rule.uncertain_from = float(np.quantile(scores, max(0.0, 1 - 2 * fpr)))
    return rule


def _tpr(rule: Rule, backdoored: list[Model]) -> float:
    return float(np.mean([rule.score(m.signals) > rule.threshold for m in backdoored])) if backdoored else 0.0


SELECTIONS = ("all", "greedy")


def check_rule(models: list[Model], rule: str) -> None:
    """Refuses a rule that names an unknown kind or reads a baseline some models were not measured with."""
    if rule not in RULES:
        raise MapPruneError(f"rule is one of {', '.join(RULES)}, got {rule!r}")
    for b in RULES[rule]:
        lacking = [m.name for m in models if b not in m.signals]
        if lacking:
            raise MapPruneError(f"the rule {rule} reads {b}, which {len(lacking)} models lack ({', '.join(lacking[:3])}"
                                f"{' ...' if len(lacking) > 3 else ''}); calibrate without --no-mmbd, or use --rule fmt")


def choose_signals(models: list[Model], fpr: float, selection: str = "all", rule: str = "fmt") -> list[str]:
    """The rule's signals. ``all``: every FMT signal every model has (no family can be left out of the rule by
    the families it was calibrated on), with the baselines ``rule`` adds (:data:`RULES`). ``greedy``: forward
    selection from those, adding the signal that most raises the mean TPR over the calibration set's families (at
    the rule's own threshold), while it rises."""
    if selection not in SELECTIONS:
        raise MapPruneError(f"selection is one of {', '.join(SELECTIONS)}, got {selection!r}")
    check_rule(models, rule)
    pool = [s for s in SIGNALS if (s not in BASELINES or s in RULES[rule]) and all(s in m.signals for m in models)]
    families = sorted({m.family for m in models if m.backdoored})
    if not pool:
        raise MapPruneError("no signal is present in every model's scan; rescan the population with the default probes")
    if selection == "all":
        return pool
    if not families:
        raise MapPruneError("greedy signal selection needs backdoored models")

    def value(chosen):
        rule = fit_rule(models, chosen, fpr)
        return float(np.mean([_tpr(rule, [m for m in models if m.family == f]) for f in families]))

    chosen, best = [], -1.0
    while True:
        trials = [(value(chosen + [s]), s) for s in pool if s not in chosen]
        if not trials:
            break
        v, s = max(trials, key=lambda t: (t[0], -pool.index(t[1])))
        if v <= best + 1e-9:
            break
        chosen, best = chosen + [s], v
    return chosen


def clopper_pearson(k: int, n: int) -> list[float]:
    if n == 0:
        return [float("nan"), float("nan")]
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
    return [round(float(ci.low), 4), round(float(ci.high), 4)]


def auroc(pos: list[float], neg: list[float]) -> float:
    """P(a backdoored model's score > a clean one's), ties counting half."""
    if not pos or not neg:
        return float("nan")
    p, n = np.asarray(pos)[:, None], np.asarray(neg)[None, :]
    return float(((p > n) + 0.5 * (p == n)).mean())


def auroc_ci(pos: list[float], neg: list[float], rounds: int = 2000, seed: int = 0) -> list[float]:
    """A percentile bootstrap 95% interval of :func:`auroc` (models resampled within each group)."""
    if not pos or not neg:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    pos, neg = np.asarray(pos), np.asarray(neg)
    draws = [auroc(list(rng.choice(pos, len(pos))), list(rng.choice(neg, len(neg)))) for _ in range(rounds)]
    return [round(float(np.quantile(draws, 0.025)), 4), round(float(np.quantile(draws, 0.975)), 4)]


def _rate(hits: int, n: int) -> dict:
    return {"rate": round(hits / n, 4) if n else None, "hits": hits, "n": n, "ci95": clopper_pearson(hits, n)}


def held_out_scores(models: list[Model], fpr: float, by: str, selection: str = "all", rule: str = "fmt") -> dict:
    """Each model's (score, threshold, uncertain_from) under a rule made without it. ``by="family"``: a
    backdoored model is judged by a rule made without its whole family, a clean model by one made without itself.
    ``by="architecture"``: every model is judged by a rule made from the other architectures' models only."""
    rules: dict[frozenset, Rule] = {}
    out = {}
    for m in models:
        if by == "architecture":
            keep = [o for o in models if o.architecture != m.architecture]
        elif m.backdoored:
            keep = [o for o in models if not (o.backdoored and o.family == m.family)]
        else:
            keep = [o for o in models if o is not m]
        key = frozenset(o.name for o in keep)
        if key not in rules:
            rules[key] = fit_rule(keep, choose_signals(keep, fpr, selection, rule), fpr)
        fitted = rules[key]
        out[m.name] = (fitted.score(m.signals), fitted.threshold, fitted.uncertain_from)
    return out


MIN_CLEAN = 4  # clean models a rule and its leave-one-out false-positive rate need at the least


def enough_models(models: list[Model]) -> bool:
    """Whether :func:`evaluate` can set a rule on ``models``: at least ``MIN_CLEAN`` clean and one backdoored."""
    return sum(not m.backdoored for m in models) >= MIN_CLEAN and any(m.backdoored for m in models)


def evaluate(models: list[Model], fpr: float = 0.05, selection: str = "all", rule: str = "fmt") -> dict:
    """The calibration report: the rule (``rule``: which signals may enter it, :data:`RULES`) fitted on every
    model, and held-out error rates by family and by architecture, with the baselines' AUROC on the same models."""
    clean = [m for m in models if not m.backdoored]
    backdoored = [m for m in models if m.backdoored]
    if not enough_models(models):
        raise MapPruneError(f"calibration needs at least {MIN_CLEAN} clean and 1 backdoored model, got {len(clean)} and "
                            f"{len(backdoored)}")
    fitted = fit_rule(models, choose_signals(models, fpr, selection, rule), fpr)
    report = {"rule": {**fitted.to_json(), "kind": rule}, "selection": selection,
              "population": {"clean": len(clean), "backdoored": len(backdoored)}}
    for name, by, group in (("by_family", "family", lambda m: m.family),
                            ("by_architecture", "architecture", lambda m: m.architecture)):
        if by == "architecture" and len({m.architecture for m in models}) < 2:
            continue
        scored = held_out_scores(models, fpr, by, selection, rule)
        rows = {}
        for g in sorted({group(m) for m in models}):
            members = [m for m in models if group(m) == g]
            pos = [m for m in members if m.backdoored]
            neg = [m for m in members if not m.backdoored]
            rows[g] = {"tpr": _rate(sum(scored[m.name][0] > scored[m.name][1] for m in pos), len(pos)),
                       "fpr": _rate(sum(scored[m.name][0] > scored[m.name][1] for m in neg), len(neg)),
                       "uncertain": sum(scored[m.name][2] < scored[m.name][0] <= scored[m.name][1] for m in members)}
        pos = [scored[m.name][0] - scored[m.name][1] for m in backdoored]
        neg = [scored[m.name][0] - scored[m.name][1] for m in clean]
        report[name] = {"groups": rows,
                        "tpr": _rate(sum(v > 0 for v in pos), len(pos)), "fpr": _rate(sum(v > 0 for v in neg), len(neg)),
                        "auroc": round(auroc(pos, neg), 4), "auroc_ci95": auroc_ci(pos, neg)}
    report["baselines"] = {}
    for b in BASELINES:
        have = [m for m in models if b in m.signals]
        pos = [m.signals[b] for m in have if m.backdoored]
        neg = [m.signals[b] for m in have if not m.backdoored]
        if pos and neg:
            report["baselines"][b] = {"models": len(have), "auroc": round(auroc(pos, neg), 4),
                                      "auroc_ci95": auroc_ci(pos, neg)}
    return report
