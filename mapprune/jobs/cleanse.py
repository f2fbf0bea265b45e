"""``mapprune cleanse``'s job: poisoned-training-sample detection (:mod:`mapprune.cleanse`) on a run's training set,
each detector's scores, flags and measurement written under ``RUN/cleanse/<detector>/``.

The training set is rebuilt as the model was trained on it (the attack's poisoning with the run's seed, checked
against the poison indices the run recorded; minus the images a run made with ``--exclude`` left out). The defender's
clean subset (class-balanced ``clean_ratio`` of the training set, seeded as ``mapprune defend`` draws it) is split
once into ``fit`` (80%: statistics) and ``cal`` (20%: thresholds). The detectors never read the poison indices, the
trigger or the target; the measurement does (:func:`mapprune.cleanse.measure`), and leaves the clean subset's images
out of it.

Per detector, three files, each written atomically under the folder's lock:

- ``result.json``: settings, the rule the flags come from, flagged count, the per-class statistic and suspected
  target, AUROC (global and inside the attack's target class), TPR / FPR / precision of every rule, a summary of the
  scores, wall time;
- ``flagged.json``: the flagged training indices (``indices``: the detector's own rule, which ``mapprune attack
  --exclude`` reads; ``rules``: every rule's);
- ``scores.safetensors``: ``indices`` (int64) and ``scores`` (float64) of every scored training image.
"""

import time
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import atomic_save
from ..cleanse import PENULTIMATE, SAMPLE_DETECTORS, SampleData, create_sample_detector, measure, resolve_layer
from ..cleanse.base import SampleDetector, check_expected
from ..data import clean_subset, split_holdout
from ..device import pick_device
from ..errors import MapPruneError
from ..options import keyword_options
from ..runs import Run, acquire_folder_lock, load_run, versions, write_json

ALL = "all"
HOLDOUT = 0.2  # share of the clean subset held out for thresholds only
FOLDER = "cleanse"


def detector_names(chosen) -> list[str]:
    """The detectors to run, in registry order for ``all``; an unknown name is refused, listing the valid ones."""
    chosen = [chosen] if isinstance(chosen, str) else list(chosen or [ALL])
    if ALL in chosen:
        return SAMPLE_DETECTORS.names()
    names = []
    for name in chosen:
        SAMPLE_DETECTORS.get(name)  # refuses an unknown name, naming the valid ones
        if name not in names:
            names.append(name)
    return names


def build_detectors(names: list[str], expected: float, seed: int, options: dict | None) -> dict[str, SampleDetector]:
    """One detector per name with the common settings and each of ``options`` given to the detectors that take it;
    an option no chosen detector takes, or a bad value, is refused in one line."""
    options = dict(options or {})
    takes = {name: keyword_options(SAMPLE_DETECTORS.get(name), SampleDetector) for name in names}
    for key in options:
        if key in ("expected", "seed"):
            raise MapPruneError(f"--opt {key}= is a setting of every detector; give it as --{key}")
        if not any(key in t for t in takes.values()):
            valid = sorted({k for t in takes.values() for k in t} - {"expected", "seed"})
            raise MapPruneError(f"no chosen detector ({', '.join(names)}) takes the option {key!r}; their options: "
                                f"{', '.join(valid)}")
    return {name: create_sample_detector(name, expected=expected, seed=seed,
                                         **{k: v for k, v in options.items() if k in takes[name]})
            for name in names}


def training_set(run: Run) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """(images, labels, training indices) of the training set as the run's model was trained on it: the attack's
    poisoning rebuilt with the run's seed (and checked against the poison indices the run recorded), less the images
    an ``--exclude`` run left out."""
    ds, m = run.dataset, run.manifest
    seed = m.get("seed")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise MapPruneError(f"{run.path} records no training seed (an imported run?); cleanse rebuilds the poisoned "
                            "training set from the seed the attack was run with")
    x, y, idx = run.attack.poison_train(ds.x_train, ds.y_train, seed)
    if not torch.equal(torch.as_tensor(idx).sort().values, run.poison_indices.sort().values):
        raise MapPruneError(f"the {m['attack']['name']} poisoning rebuilt with seed {seed} does not choose the "
                            f"images {run.path} records as poisoned; cleanse cannot rebuild its training set")
    keep = np.ones(len(y), dtype=bool)
    excluded = (m.get("exclude") or {}).get("indices") or []
    keep[np.asarray(excluded, dtype=np.int64)] = False
    at = torch.from_numpy(np.flatnonzero(keep))
    return x[at], y[at], np.flatnonzero(keep)


def _summary(scores: np.ndarray) -> dict:
    if len(scores) == 0:
        return {"count": 0}
    q = np.quantile(scores, [0, 0.5, 0.9, 0.99, 1])
    return {"count": len(scores), "min": float(q[0]), "median": float(q[1]), "p90": float(q[2]), "p99": float(q[3]),
            "max": float(q[4])}


def cleanse(run_path, *, detectors=(ALL,), expected: float = 0.1, layer: str = PENULTIMATE, clean_ratio: float = 0.1,
            seed: int = 0, options: dict | None = None, data_dir=None, device=None) -> dict:
    """Runs the chosen sample detectors on the run's training set, writes ``RUN/cleanse/<detector>/`` per detector
    and returns {detector: result.json's content}. Names, settings, ``clean_ratio`` and ``layer`` are checked
    before any work; ``options``: detector settings by name (each goes to the detectors that take it)."""
    names = detector_names(detectors)
    check_expected(expected)
    built = build_detectors(names, expected, seed, options)
    if not 0 < clean_ratio < 1:
        raise MapPruneError(f"--clean-ratio is the defender's clean share of the training set, in (0, 1); got "
                            f"{clean_ratio}")
    run_path = Path(run_path)
    run = load_run(run_path, data_dir)
    resolve_layer(run.model, layer)  # a layer the model lacks is refused before any work
    lock = acquire_folder_lock(run_path / FOLDER, "cleanse")
    try:
        return _run_all(run, run_path, built, expected, layer, clean_ratio, seed, device)
    finally:
        lock.release()


def _run_all(run: Run, run_path: Path, built: dict, expected: float, layer: str, clean_ratio: float, seed: int,
             device) -> dict:
    dev = pick_device(device)
    ds, attack = run.dataset, run.attack
    x, y, indices = training_set(run)
    subset = clean_subset(ds.y_train, clean_ratio, seed)
    fit, cal = split_holdout(subset, ds.y_train, HOLDOUT, seed)
    position = np.full(len(ds.y_train), -1)
    position[indices] = np.arange(len(indices))
    fit_positions = position[fit.numpy()]
    data = SampleData(y.numpy(), ds.num_classes, model=run.model.to(dev).eval(), images=x,
                      fit_images=ds.x_train[fit], fit_labels=ds.y_train[fit].numpy(), cal_images=ds.x_train[cal],
                      cal_labels=ds.y_train[cal].numpy(), fit_positions=fit_positions[fit_positions >= 0],
                      layer=layer, device=str(dev))
    t0 = time.perf_counter()
    if any(name != "fmt" for name in built):
        data.features("train")
        data.features("fit")
    features_s = time.perf_counter() - t0
    poisoned = np.isin(indices, run.poison_indices.numpy())
    scored = ~np.isin(indices, subset.numpy())
    target = None if attack.all_to_all else int(attack.target)
    head = {"kind": "cleanse", "run": str(run_path), "attack": run.manifest["attack"]["name"], "layer": layer,
            "expected": expected, "seed": seed,
            "clean_subset": {"ratio": clean_ratio, "seed": seed, "count": len(subset), "fit": len(fit),
                             "cal": len(cal), "held_out": HOLDOUT},
            "training_images": len(indices), "features_s": round(features_s, 3)}
    results = {}
    for name, detector in built.items():
        t0 = time.perf_counter()
        detection = detector.detect(data)
        seconds = time.perf_counter() - t0
        evaluation = measure(detection, data.labels, poisoned, scored, target)
        evaluation.update({"target": target, "poisons_in_clean_subset": int((poisoned & ~scored).sum())})
        flagged = {rule: indices[np.flatnonzero(mask)].tolist() for rule, mask in detection.flags.items()}
        result = {**head, "detector": name, "paper": detector.paper, "settings": detector.params(),
                  "rule": detection.rule, "flagged": len(flagged[detection.rule]),
                  "suspected_target": detection.suspected_target, "class_statistic": detection.class_statistic,
                  "class_conditional": detection.class_conditional, "scores": _summary(detection.scores),
                  "evaluation": evaluation, "details": detection.details, "seconds": round(seconds, 3),
                  "versions": versions()}
        folder = run_path / FOLDER / name
        folder.mkdir(parents=True, exist_ok=True)
        atomic_save({"indices": torch.from_numpy(indices.astype(np.int64)),
                     "scores": torch.from_numpy(np.asarray(detection.scores, dtype=np.float64))},
                    folder / "scores.safetensors", {"detector": name, "layer": layer})
        write_json(folder / "flagged.json", {"kind": "cleanse-flagged", "run": str(run_path), "detector": name,
                                             "rule": detection.rule, "count": len(flagged[detection.rule]),
                                             "indices": flagged[detection.rule], "rules": flagged})
        write_json(folder / "result.json", result)
        results[name] = result
    return results

