"""``mapprune scan``'s job: the scan (:mod:`mapprune.detect.scan`) on a run's clean images, its report written as
scan.json and scan.png, the calibrated verdict when a calibration is given, and the command's exit status."""

import json
from pathlib import Path

from torch import nn

from ..data import clean_subset
from ..detect.calibrate import Rule, signals
from ..detect.scan import CannotJudge, ScanResult, scan
from ..errors import MapPruneError
from ..figures import pyplot
from ..probes import ANOMALY_THRESHOLD
from ..runs import write_json

EXIT_BACKDOORED = 3  # the command's exit status when the verdict is "backdoored" (0: none found; 1, 2: errors)
EXIT_CANNOT_JUDGE = 4  # the model is broken (one class for nearly every clean image, or near-chance accuracy)
EXIT_UNCERTAIN = 5  # a calibrated score near the threshold: neither verdict holds at the stated error rates


def save_scan_figure(path, result: ScanResult) -> None:
    """Per-class pull of FMT's probe (the suspected target in red), with the stimulation test its per-class pull,
    and with NC its mask norm per class."""

    plt = pyplot()
    panels = 1 + bool(result.stimulation) + bool(result.nc)
    fig, axes = plt.subplots(1, panels, figsize=(4.5 * panels, 3), squeeze=False)
    k = len(result.class_pull)
    colors = ["tab:red" if c == result.target else "tab:blue" for c in range(k)]
    axes[0, 0].bar(range(k), result.class_pull, color=colors)
    axes[0, 0].axhline(result.threshold, color="gray", linestyle="--", linewidth=0.8)
    axes[0, 0].set_title(f"FMT {result.probe} probe: pull {result.score:.2f} (threshold {result.threshold:g}), "
                         f"{'backdoored' if result.backdoored else 'no backdoor found'}"
                         + (f"; rejected class {result.rejected}" if result.rejected else ""), fontsize=8)
    axes[0, 0].set_xlabel("class")
    axes[0, 0].set_ylabel("pull of the top 2% maps")
    panel = 1
    if result.stimulation:
        st = result.stimulation
        axes[0, panel].bar(range(k), st["class_pull"], color=["tab:red" if c == st["target"] else "tab:blue"
                                                             for c in range(k)])
        axes[0, panel].set_title(f"stimulation (level {st['level']:g}): anomaly {st['anomaly_index']:.1f} "
                                 f"(threshold {ANOMALY_THRESHOLD:g})", fontsize=8)
        axes[0, panel].set_xlabel("class")
        axes[0, panel].set_ylabel("pull of the top 2% maps")
        panel += 1
    if result.nc:
        norms = result.nc["norms"]
        axes[0, panel].bar(range(k), norms, color=["tab:red" if c in result.nc["flagged"] else "tab:blue"
                                                   for c in range(k)])
        axes[0, panel].set_title(f"Neural Cleanse: anomaly {result.nc['anomaly_index']:.2f}, flagged "
                                 f"{result.nc['flagged'] or 'none'}", fontsize=8)
        axes[0, panel].set_xlabel("class")
        axes[0, panel].set_ylabel("reversed mask L1 norm")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def load_calibration(path) -> dict:
    """A calibration file written by ``mapprune calibrate`` (its rule checked here, before any work)."""

    cal = read_calibration(path)
    if cal.get("rule") is None:
        pop = cal.get("population", {})
        raise MapPruneError(f"{path} records {pop.get('clean', 0)} clean and {pop.get('backdoored', 0)} backdoored "
                            "models, too few to set a rule; calibrate again with more models (give it the file and "
                            "their run folders)")
    cal["_rule"] = Rule.from_json(cal["rule"])
    cal["_path"] = str(path)
    return cal


def read_calibration(path) -> dict:
    """A calibration file's content, checked to be one (a population too small for a rule included)."""

    path = Path(path)
    try:
        cal = json.loads(path.read_text())
    except FileNotFoundError:
        raise MapPruneError(f"calibration file {path} not found") from None
    except (OSError, ValueError) as e:
        raise MapPruneError(f"calibration file {path} is not readable JSON ({e}); regenerate it with mapprune "
                            "calibrate") from None
    if not isinstance(cal, dict) or cal.get("kind") != "scan-calibration":
        raise MapPruneError(f"{path} is not a scan calibration (written by mapprune calibrate)")
    return cal


def calibrated_verdict(report: dict, calibration: dict, kind: dict | None = None) -> dict:
    """The calibrated rule applied to a scan report's signals: {"verdict", "score", "threshold", "uncertain_from",
    "expected" (the error rates measured when the calibration was made), "file", "outside"}. ``kind`` (the
    model's dataset, architecture and width, :func:`mapprune.jobs.calibrate.model_kind`): when the calibration's
    population has no model of that kind, ``outside`` says so (the stated error rates were not measured on such
    models); None when it has, or when either side does not say."""

    rule = calibration["_rule"]
    values = signals(report)
    score = rule.score(values)
    return {"verdict": rule.verdict(values), "score": round(score, 4), "threshold": round(rule.threshold, 4),
            "uncertain_from": round(rule.uncertain_from, 4), "signals": rule.signals,
            "expected": calibration.get("expected"), "file": calibration["_path"],
            "outside": _outside(kind, calibration.get("population", {}).get("kinds"))}


def _outside(kind: dict | None, kinds: list | None) -> str | None:
    if not kind or not kinds or kind in kinds:
        return None
    seen = "; ".join(f"{k['architecture']} width {k['width']} on {k['dataset']}" for k in kinds)
    return (f"this model ({kind['architecture']} width {kind['width']} on {kind['dataset']}) is of no kind the "
            f"calibration's population holds ({seen}): its error rates were not measured on such models")


def scan_and_save(model: nn.Module, ds, out: Path, *, name: str, clean_ratio: float = 0.1, seed: int = 0,
                  calibration: dict | None = None, kind: dict | None = None, **scan_kw) -> dict:
    """Scans ``model`` with the clean subset of ``ds``'s training set, writes ``out``/scan.json and scan.png, and
    returns the report. A model that cannot be judged gets the verdict "cannot judge" (no exception); with a
    ``calibration``, the calibrated rule's verdict ("backdoored", "uncertain", "no backdoor found") is the
    report's verdict, its error rates beside it."""

    idx = clean_subset(ds.y_train, clean_ratio, seed)
    head = {"model": name, "dataset": ds.name, "clean_images": len(idx), "clean_ratio": clean_ratio, "seed": seed}
    try:
        result = scan(model, ds.x_train[idx], ds.y_train[idx], seed=seed, num_classes=ds.num_classes, **scan_kw)
    except CannotJudge as e:
        report = {**head, "verdict": "cannot judge", "backdoored": None, "reason": str(e), **e.details}
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "scan.json", report)
        return report
    report = {**head, **result.to_json(), "calibration": None}
    if calibration is not None:
        cal = calibrated_verdict(report, calibration, kind)
        report.update({"calibration": cal, "verdict": cal["verdict"],
                       "backdoored": {"backdoored": True, "uncertain": None}.get(cal["verdict"], False),
                       "fixed_rule_verdict": result.to_json()["verdict"]})
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "scan.json", report)
    save_scan_figure(out / "scan.png", result)
    return report


def exit_status(report: dict) -> int:
    """The command's exit status for a report's verdict."""
    return {"backdoored": EXIT_BACKDOORED, "uncertain": EXIT_UNCERTAIN, "cannot judge": EXIT_CANNOT_JUDGE}.get(
        report["verdict"], 0)
