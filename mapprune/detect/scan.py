"""Is this model backdoored? A verdict from FMT's testing phase, with Neural Cleanse as a second opinion.

FMT's probes (the recommended recipe's three: a small universal patch, a 1-pixel warp and a smooth additive field
per map, in one shared pass; no trigger, the defender's clean images only) perturb each feature map on its own
and record where the predictions go; the probe with the largest pull decides (a patch trigger shows in the patch
probe, a low-frequency one in the smooth probe). A backdoor's maps, excited, pull images of every
class to one class. Per class, the pull of its hardest-pulling 2% of maps: the share of the other classes' images
they send to it, above what a random perturbation of the same size does. The suspected target is the class with
the largest pull, the suspicion score is that pull (0: no more than chance, 1: every image), and the verdict is
"backdoored" above ``threshold``. The robust z-score of that pull among the K classes (:func:`estimate_target`'s
anomaly index) is reported too; with ten classes it is noisy (an 8x8 digits model with no backdoor reaches 10.4,
its pull is 0.10), so it does not decide.

The default threshold (0.5) is set from clean models only, never from the backdoored ones it is judged on: the
clean models measured pull 0.13-0.31 (six CIFAR-10 CPU-preset models) and 0.07-0.10 (digits); docs/results.md,
"The scan: detection over 15 models". ``mapprune calibrate`` sets the rule on a population of models instead
(:mod:`mapprune.detect.calibrate`). Neural Cleanse's anomaly
index (MAD over reversed-trigger norms, flagged above 2) is reported beside it when ``nc`` is on; it does not
change the verdict.

A second, trigger-free sign decides too: a **rejected class**, one whose clean images the model gets right less than
``metrics.REJECTED`` (a quarter) as often as the median class. A clean-label attack that poisons every training image of
its target (SIG or LC at BackdoorBench's 10% on CIFAR-10) leaves a model that predicts the target only when the
trigger is there; no single-map probe can pull there (the model gives the class almost no probability), but its
clean accuracy on that class is near zero. The clean CIFAR-10 model's weakest class (cat) is at 0.83 of the
median on the scan's clean images, the SIG and LC models' class 0 at 0.00.

A third sign sees the triggers no input probe can draw (a blend over the whole image, a warp, a learned
per-image pattern): the **stimulation test** (:mod:`mapprune.probes.stimulation`) sets each map directly to its
clean mean plus ``stimulate`` standard deviations and records where the other classes' images go; its anomaly
index (the robust z-score of the hardest-pulling 2% of maps' pull among the classes) above
``stimulation.ANOMALY_THRESHOLD`` makes the verdict "backdoored". That threshold is set from clean models and
from a backdoored model's non-target class, never from a real target (docs/scan.md, "What the scan looks at").

The verdict is "backdoored" when any sign fires; the suspected target is then the probes' class if their pull is
over the threshold, else the rejected class, else the stimulation test's class.
"""

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ..defenses import FMT, create_defense
from ..device import pick_device
from ..errors import MapPruneError
from ..images import as_uint8
from ..metrics import judged_class_accuracy, predict, rejected_classes
from ..probes import PULL_THRESHOLD, class_pull, estimate_target, fired_signs
from .mmbd import mmbd as run_mmbd

THRESHOLD = PULL_THRESHOLD
PROBES = ("patch", "warp", "smooth")  # the recommended recipe's probes, tested in one shared pass
# A model that puts this share of the clean images in one class, or whose clean accuracy is below this many
# times chance, is not judged: its probes would measure the collapse, not a backdoor.
DEGENERATE_SHARE = 0.8
CHANCE_FACTOR = 1.5


class CannotJudge(MapPruneError):
    """The model is not fit to be judged; ``details`` says why (recorded in scan.json)."""

    def __init__(self, message: str, details: dict):
        super().__init__(message)
        self.details = details


def check_judgeable(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> None:
    """Raises :class:`CannotJudge` when the model's predictions on clean images are degenerate: one class takes
    ``DEGENERATE_SHARE`` of them, or the accuracy is under ``CHANCE_FACTOR`` times chance."""
    share = torch.bincount(predictions, minlength=num_classes).float() / len(predictions)
    top = int(share.argmax())
    acc = float((predictions == labels).float().mean())
    details = {"majority_class": top, "majority_share": round(float(share[top]), 4), "clean_accuracy": round(acc, 4)}
    if share[top] >= DEGENERATE_SHARE:
        raise CannotJudge(f"cannot judge: the model predicts class {top} for {float(share[top]):.0%} of clean images "
                          "(a broken or collapsed model; a backdoor scan needs a working classifier)", details)
    if acc < CHANCE_FACTOR / num_classes:
        raise CannotJudge(f"cannot judge: the model's clean accuracy is {acc:.1%}, near chance (1/{num_classes}); "
                          "check that the checkpoint, its architecture and the dataset belong together", details)


@dataclass
class ScanResult:
    """What :func:`scan` found: the verdict (``backdoored``), the probes' score and suspected target, and each
    sign's details; :meth:`to_json` is what scan.json holds."""

    backdoored: bool
    score: float  # the suspected target's pull (FMT's probe)
    threshold: float
    anomaly_index: float  # the robust z-score of that pull among the classes
    target: int
    class_pull: list[float]
    suspicious_maps: list[dict]  # the maps that pull hardest to the suspected target
    probe: str = "patch"  # the probe whose pull decided (the largest)
    probes: dict = field(default_factory=dict)  # per probe: its suspected target, pull and anomaly index
    nc: dict | None = None  # Neural Cleanse's detection, when run
    mmbd: dict | None = None  # MM-BD's detection (data-free), when run
    class_acc: list = field(default_factory=list)  # the model's accuracy on each class's clean images (None: too few)
    rejected: list[int] = field(default_factory=list)  # classes the model rejects (see metrics.REJECTED)
    stimulation: dict | None = None  # the stimulation test's suspected target, anomaly index and pull, when run
    timings: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"verdict": "backdoored" if self.backdoored else "no backdoor found", "backdoored": self.backdoored,
                "score": round(self.score, 4), "threshold": self.threshold, "suspected_target": self.target,
                "anomaly_index": round(self.anomaly_index, 4), "probe": self.probe, "probes": self.probes,
                "class_pull": self.class_pull, "class_acc": self.class_acc, "rejected_classes": self.rejected,
                "suspicious_maps": self.suspicious_maps, "stimulation": self.stimulation, "neural_cleanse": self.nc,
                "mmbd": self.mmbd, "timings": self.timings}


def scan(model: nn.Module, images, labels, *, threshold: float = THRESHOLD, n_maps: int = 10, nc: bool = True,
         nc_options: dict | None = None, probes: tuple[str, ...] = PROBES, stimulate: float = 4.0,
         stimulate_images: int = 30, seed: int = 0, device=None, progress: bool = False,
         num_classes: int | None = None, mmbd: bool = False) -> ScanResult:
    """Scans ``model`` (any nn.Module taking [0, 1] pixels) with the clean ``images`` and ``labels``. ``probes``:
    which of FMT's probes to run (one shared pass); the largest pull among them decides, and a rejected class or
    the stimulation test (``stimulate``: its level, 0 to skip it; see the module's docstring) makes the verdict
    "backdoored" too. A degenerate model raises :class:`CannotJudge` before any probe runs. ``nc`` and ``mmbd``
    add Neural Cleanse's and MM-BD's detections beside the verdict (they do not change it)."""

    if not 0 < threshold < 1 or n_maps < 1:
        raise MapPruneError(f"threshold is a pull in (0, 1) and n_maps >= 1, got {threshold} and {n_maps}")
    unknown = [p for p in probes if p not in PROBES]
    if unknown or not probes:
        raise MapPruneError(f"unknown probe {unknown[0] if unknown else None!r}; valid: {', '.join(PROBES)}")
    y = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    x = as_uint8(images, y, what="clean images")
    dev = pick_device(device)
    model = model.to(dev).eval()
    predictions = predict(model, x, device=dev)
    check_judgeable(predictions, y, int(y.max()) + 1 if num_classes is None else num_classes)
    fmt = FMT(seed=seed, device=device, progress=progress, stimulate=stimulate, stimulate_images=stimulate_images)
    nc_defense = create_defense("nc", seed=seed, device=device, progress=progress, **(nc_options or {})) if nc \
        else None  # built first: a bad NC option fails before the probe runs
    t0 = time.perf_counter()
    sizes = {"patch": fmt.eps, "warp": fmt.unlearn_warp, "smooth": fmt.unlearn_smooth}
    tests = fmt.probes(model, x, y, {p: sizes[p] for p in probes})
    timings = {"fmt_probe": time.perf_counter() - t0}
    found = {p: estimate_target(t) for p, t in tests.items()}
    best = max(found, key=lambda p: max(found[p]["class_pull"]))
    test, target = tests[best], found[best]
    summary = {p: {"suspected_target": t["target"], "pull": round(max(t["class_pull"]), 4),
                   "anomaly_index": round(t["anomaly_index"], 4)} for p, t in found.items()}
    pull = class_pull(test)[:, target["target"]]
    owners = [(name, c) for name, acc in test.acc.items() for c in range(len(acc))]
    top = pull.topk(min(n_maps, len(pull))).indices.tolist()
    maps = [{"layer": owners[i][0], "channel": owners[i][1], "pull": round(float(pull[i]), 4)} for i in top]
    stimulation = None
    if stimulate > 0:
        t0 = time.perf_counter()
        stimulation = fmt.stimulation(model, x, y)
        timings["stimulate"] = time.perf_counter() - t0
    detection = None
    if nc_defense is not None:
        t0 = time.perf_counter()
        detection = neural_cleanse(model, x, y, nc_defense, dev)
        timings["neural_cleanse"] = time.perf_counter() - t0
    k = len(target["class_pull"])
    found_mmbd = None
    if mmbd:
        found_mmbd = run_mmbd(model, k, tuple(x.shape[1:]), seed=seed, device=dev)
        timings["mmbd"] = found_mmbd["seconds"]
    class_acc = judged_class_accuracy(predictions, y, k)
    rejected = rejected_classes(class_acc)
    score = max(target["class_pull"])
    signs = fired_signs({p: max(t["class_pull"]) for p, t in found.items()}, rejected,
                        stimulation["anomaly_index"] if stimulation is not None else None, threshold)
    if score > threshold or not signs:
        suspected = target["target"]
    else:
        suspected = min(rejected, key=lambda c: class_acc[c]) if rejected else stimulation["target"]
    return ScanResult(bool(signs), score, threshold, target["anomaly_index"],
                      suspected, target["class_pull"], maps, best, summary, detection, found_mmbd, class_acc,
                      rejected, stimulation, timings)


def neural_cleanse(model: nn.Module, x: torch.Tensor, y: torch.Tensor, defense=None, device=None) -> dict:
    """Neural Cleanse's detection (its anomaly index over the K reversed triggers' mask norms) with the scan's clean
    images; ``defense``: an NC defense with its options (the defaults otherwise)."""

    dev = pick_device(device)
    defense = defense or create_defense("nc", seed=0, device=device)
    detection, _ = defense.detect(model.to(dev).eval(), defense.split(x, y), dev)
    return detection
