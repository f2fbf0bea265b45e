"""``mapprune guard``'s job: input detectors (:mod:`mapprune.guard`) fitted and calibrated on the defender's clean
images, then measured on the run's clean and triggered test images.

The defender's clean subset (the class-balanced share of the training set every defense gets, drawn with
``seed``) is split once, seeded and class-balanced, into fit images (80%: what a detector learns from) and
calibration images (20%: only for the threshold at ``fpr``). The test sets are touched only to measure: AUROC,
the detection rate (TPR) at the calibrated threshold, the false-positive rate that threshold actually reaches on the
clean test images, the same on the "effective" subset (clean images the model gets right, triggered images that
reach the target), the paper's fixed rule where it has one, the TPR at ``fpr`` read off the test ROC (an oracle,
labelled so), and the cost: forward passes and wall time per image beside the bare model's on the same images.
Each detector's report is written to ``RUN/guard/<defense variant or "model">/<detector>.json``.
"""

import time
from pathlib import Path

import torch

from ..data import clean_subset, split_holdout
from ..device import pick_device
from ..errors import MapPruneError
from ..evaluation import defended_model
from ..guard import INPUT_DETECTORS, InputDetector, auroc, calibration_images_needed, create_detector, oracle_tpr_at_fpr, rate
from ..guard.base import evaluating, model_device
from ..runs import acquire_folder_lock, load_run, versions, write_json
from .defend import DEFAULT_CLEAN_RATIO

CALIBRATION_SHARE = 0.2  # of the clean subset; the rest is what the detectors learn from
TIMING_BATCH = 256  # the bare model's batch when its time per image is measured


def detectors_from(names, options: dict | None = None) -> dict[str, InputDetector]:
    """{name: detector} for ``names`` (``"all"``: every registered one), each with its ``options[name]`` settings;
    an unknown name or setting is refused in one line."""
    names = list(names or ["all"])
    if "all" in names:
        names = [n for n in INPUT_DETECTORS.names() if n not in names] + [n for n in names if n != "all"]
    if len(set(names)) != len(names):
        raise MapPruneError(f"--detector names each detector once; got {', '.join(names)}")
    options = options or {}
    for name in options:
        if name not in names:
            raise MapPruneError(f"--detector-opt gives settings for {name!r}, which is not among the detectors run "
                                f"({', '.join(names)})")
    return {n: create_detector(n, **options.get(n, {})) for n in names}


def _pick(n: int, limit: int | None, seed: int) -> torch.Tensor:
    """All of ``n`` indices, or ``limit`` of them drawn with ``seed`` (sorted)."""
    if limit is None or limit >= n:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:limit].sort().values


@torch.no_grad()
def _bare_seconds_per_image(model, x: torch.Tensor) -> float:
    device = model_device(model)
    start = time.perf_counter()
    with evaluating(model):
        for i in range(0, len(x), TIMING_BATCH):
            model(x[i:i + TIMING_BATCH].to(device).float().div_(255))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / len(x)


def guard(run_path, *, defense: str | None = None, detectors=("all",), options: dict | None = None,
          fpr: float = 0.05, seed: int = 0, clean_ratio: float | None = None, test_images: int | None = None,
          data_dir=None, device=None, log=print) -> dict:
    """Fits, calibrates and measures each of ``detectors`` on the run's model (or the model ``defense`` wrote);
    writes one report per detector and returns {"detectors": {name: report}, ...the shared settings}.
    ``test_images``: at most this many images of each test set (drawn with ``seed``; all by default).
    ``log``: where each detector's finished line goes (None: nowhere)."""
    if not 0 < fpr < 1:
        raise MapPruneError(f"--fpr is the false-positive rate to calibrate at, a fraction in (0, 1); got {fpr}")
    if test_images is not None and test_images < 1:
        raise MapPruneError(f"--test-images is how many images of each test set to measure on, at least 1; got "
                            f"{test_images}")
    if clean_ratio is not None and not 0 < clean_ratio <= 1:
        raise MapPruneError(f"--clean-ratio is the clean share of the training set, in (0, 1]; got {clean_ratio}")
    if defense is not None and (not defense or defense.startswith(".") or any(c in defense for c in "/\\\0")):
        raise MapPruneError(f"--defense names a folder under RUN/defense/ (as mapprune defend wrote it), got {defense!r}")
    chosen = detectors_from(detectors, options)
    run_path = Path(run_path)
    run = load_run(run_path, data_dir)
    model = run.model if defense is None else defended_model(run, run_path, defense)
    ds = run.dataset
    ratio = clean_ratio if clean_ratio is not None else DEFAULT_CLEAN_RATIO.get(ds.name, 0.1)
    idx = clean_subset(ds.y_train, ratio, seed)
    fit, cal = split_holdout(idx, ds.y_train, CALIBRATION_SHARE, seed)
    if len(cal) < calibration_images_needed(fpr):
        raise MapPruneError(f"the clean subset gives {len(cal)} calibration images, and a false-positive rate of "
                            f"{fpr:g} needs at least {calibration_images_needed(fpr)}; raise --fpr or --clean-ratio")
    folder = run_path / "guard" / (defense or "model")
    lock = acquire_folder_lock(folder, "guard")  # refused in one line while another command writes the folder
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return _measure_all(run, run_path, model, chosen, folder, defense, fit, cal, ratio, fpr, seed, test_images,
                            device, log)
    finally:
        lock.release()


def _measure_all(run, run_path, model, chosen, folder, defense, fit, cal, ratio, fpr, seed, test_images, device,
                 log) -> dict:
    ds = run.dataset
    model = model.to(pick_device(device)).eval()
    tests = run.test_sets()
    x_clean, y_clean = tests["clean"]
    x_trig, y_target, y_true = tests["backdoor"]
    keep_c, keep_t = _pick(len(y_clean), test_images, seed), _pick(len(y_target), test_images, seed)
    x_clean, y_clean = x_clean[keep_c], y_clean[keep_c]
    x_trig, y_target, y_true = x_trig[keep_t], y_target[keep_t], y_true[keep_t]
    _bare_seconds_per_image(model, x_clean[:TIMING_BATCH])  # warm-up: the first passes allocate
    bare = _bare_seconds_per_image(model, torch.cat([x_clean, x_trig]))
    shared = {"kind": "guard", "run": str(run_path), "defense": defense, "attack": run.manifest["attack"]["name"],
              "dataset": ds.name, "fpr_target": fpr, "seed": seed,
              "clean_subset": {"ratio": ratio, "seed": seed, "fit": fit.tolist(), "calibration": cal.tolist()},
              "test_images": {"clean": len(y_clean), "triggered": len(y_target), "limit": test_images},
              "bare_model": {"forward_passes": 1, "ms_per_image": round(1000 * bare, 4)}}
    out = {**shared, "detectors": {}}
    if log:
        log(f"{run_path}{' + ' + defense if defense else ''}: {len(y_clean)} clean and {len(y_target)} triggered test "
            f"images; detectors fitted on {len(fit)} clean images, thresholds at FPR {fpr:g} on {len(cal)} others; "
            f"bare model {1000 * bare:.3f} ms/image")
        log(TABLE_HEADER)
    for name, detector in chosen.items():
        t0 = time.perf_counter()
        detector.fit(model, ds.x_train[fit], ds.y_train[fit])
        t1 = time.perf_counter()
        detector.calibrate(model, ds.x_train[cal], fpr)
        t2 = time.perf_counter()
        logits_c, s_clean = detector.predict_and_score(model, x_clean)
        logits_t, s_trig = detector.predict_and_score(model, x_trig)
        s_clean, s_trig = s_clean.cpu(), s_trig.cpu()  # waits for the device: the time is the work's
        t3 = time.perf_counter()
        right = logits_c.argmax(1).cpu() == y_clean
        reached = logits_t.argmax(1).cpu() == y_target
        per_image = (t3 - t2) / (len(y_clean) + len(y_target))
        report = {**shared, "detector": name, "paper": detector.paper, "settings": detector.settings(),
                  "learned": detector.state(), "threshold": detector.threshold,
                  "calibration_images": detector.calibration_images,
                  "all": _rates(detector, s_trig, s_clean, fpr),
                  "effective": {**_rates(detector, s_trig[reached], s_clean[right], fpr),
                                "clean": int(right.sum()), "triggered": int(reached.sum())},
                  "cost": {"forward_passes": detector.forward_passes(), "ms_per_image": round(1000 * per_image, 4),
                           "vs_bare": round(per_image / bare, 2) if bare > 0 else None,
                           "fit_s": round(t1 - t0, 3), "calibrate_s": round(t2 - t1, 3)},
                  "scores": {"clean": [round(float(v), 5) for v in s_clean],
                             "triggered": [round(float(v), 5) for v in s_trig]},
                  "versions": versions()}
        write_json(folder / f"{name}.json", report)
        out["detectors"][name] = report
        if log:
            log(summary_row(report))
    return out


def _rates(detector: InputDetector, trig: torch.Tensor, clean: torch.Tensor, fpr: float) -> dict:
    out = {"auroc": auroc(trig, clean), "tpr": rate(detector.flags(trig)), "fpr": rate(detector.flags(clean)),
           "oracle_tpr_at_fpr": oracle_tpr_at_fpr(trig, clean, fpr)}
    if detector.published_threshold is not None:
        out["published_rule"] = {"threshold": detector.published_threshold,
                                 "tpr": rate(trig >= detector.published_threshold),
                                 "fpr": rate(clean >= detector.published_threshold)}
    return out


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


TABLE_HEADER = ("| detector | AUROC | TPR | FPR reached | AUROC (effective) | passes/image | ms/image | vs bare |\n"
                "|---|---|---|---|---|---|---|---|")


def summary_row(report: dict) -> str:
    """One detector's line of the command's table."""
    a, e, c = report["all"], report["effective"], report["cost"]
    auc = "-" if a["auroc"] is None else f"{a['auroc']:.3f}"
    eff = "-" if e["auroc"] is None else f"{e['auroc']:.3f}"
    return (f"| {report['detector']} | {auc} | {_pct(a['tpr'])} | {_pct(a['fpr'])} | {eff} | {c['forward_passes']} | "
            f"{c['ms_per_image']:.3f} | {c['vs_bare']}x |")
