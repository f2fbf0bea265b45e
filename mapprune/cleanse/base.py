"""Poisoned-training-sample detection: the protocol every sample detector follows, and what they share.

A sample detector reads a model's training set as the model was trained on it (poisoned images with the labels they
were trained with) and returns a :class:`SampleDetection`: a score per image (higher = more likely poisoned), the
images flagged by one or more rules that need no ground truth, and, for the class-conditional methods, a statistic
per class and the class it suspects to be the target. No detector sees the poison indices, the trigger or the
attack's target.

The data (:class:`SampleData`) has three parts (docs/cleanse.md, "Data roles"):

- ``train``: the images to inspect, every one of the training set, with their trained labels;
- ``fit``: the defender's clean images, on which a method may fit statistics (SCAn's global model, FMT's probes and
  clean activation statistics);
- ``cal``: further clean images, held out for thresholds only (the FMT-guided detector's FPR-calibrated rule).

Features are read at one named layer (``layer``): ``"penultimate"`` (the default) is the input of the classifier head
(the last nn.Linear), flattened; any other module name reads that module's output, flattened. They are computed
once, in eval mode, without augmentation, and handed to every detector as float64.

``expected`` (the declared contamination bound) is a share of the training set, the same for every method and never
read from the attack: at most ``expected * N`` images are poisoned. Every detection carries the rule ``"expected"``,
which flags the ``ceil(expected * N)`` highest scores (class-conditional scores are first made comparable across
classes by a robust z-score inside each class: (s - median) / (1.4826 MAD)); each method adds its own rule(s) as
its paper states them, one of which is the detector's answer (:attr:`SampleDetection.rule`).
"""

import math
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
from threadpoolctl import threadpool_limits
from torch import nn

from ..device import pick_device
from ..errors import MapPruneError
from ..options import check_options
from ..probes import forward_hooks
from ..registry import Registry

PENULTIMATE = "penultimate"
MAD_SCALE = 1.4826  # MAD to a normal distribution's standard deviation


def robust_z(values: np.ndarray) -> np.ndarray:
    """(v - median) / (1.4826 MAD) of ``values``; where the MAD is 0 (more than half the values equal), the mean
    absolute deviation from the median stands in for it (times sqrt(pi/2), a normal's ratio), and where that is 0
    too every value gets 0."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        return v.copy()
    med = np.median(v)
    spread = MAD_SCALE * np.median(np.abs(v - med))
    if spread <= 0:
        spread = math.sqrt(math.pi / 2) * np.mean(np.abs(v - med))
    if spread <= 0:
        return np.zeros_like(v)
    return (v - med) / spread


def one_sided_anomaly(statistic) -> np.ndarray:
    """Per class, the robust z-score of its statistic among the classes', counted only above the median (a class with
    an unusually small statistic is not suspicious); 0 below it."""
    z = robust_z(np.asarray(statistic, dtype=np.float64))
    return np.where(z > 0, z, 0.0)


def top_k_mask(scores: np.ndarray, k: int, among: np.ndarray | None = None) -> np.ndarray:
    """Boolean mask of the ``k`` highest ``scores`` (among the positions where ``among`` is True, if given); ties are
    broken by position so the mask is reproducible."""
    mask = np.zeros(len(scores), dtype=bool)
    pos = np.arange(len(scores)) if among is None else np.flatnonzero(among)
    k = int(min(max(k, 0), len(pos)))
    if k:
        order = np.lexsort((pos, -scores[pos]))  # highest score first, then the lower position
        mask[pos[order[:k]]] = True
    return mask


def ceil_count(x: float) -> int:
    """ceil(x) for a count computed as a product of shares (1.5 x 0.1 x 300 is 45.000000000000007 in floating
    point, which must stay 45)."""
    return math.ceil(round(x, 9))


def class_count_bound(expected: float, n_total: int, n_class: int) -> int:
    """The declared bound on the poisons one class may hold: ``expected * N`` (the whole budget could sit in one
    class), at most the class's size."""
    return int(min(ceil_count(expected * n_total), n_class))


def check_expected(expected) -> None:
    """Refuses, in one line, a declared contamination share outside (0, 0.5] (more than half the training set
    poisoned leaves no majority for any method to call clean)."""
    if not (isinstance(expected, int | float) and not isinstance(expected, bool) and 0 < expected <= 0.5):
        raise MapPruneError(f"--expected is the declared share of poisoned training images, in (0, 0.5]; got "
                            f"{expected}")


# -- features -----------------------------------------------------------------------------------------------------
def resolve_layer(model: nn.Module, layer: str) -> tuple[str, nn.Module, bool]:
    """(module name, module, whether its input rather than its output is read) for ``layer``: ``"penultimate"``
    is the input of the last nn.Linear (the classifier head); any other value is a module name, with or without the
    ``net.`` prefix the :class:`~mapprune.models.wrapper.Normalized` wrapper adds."""
    modules = dict(model.named_modules())
    if layer == PENULTIMATE:
        heads = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
        if not heads:
            raise MapPruneError("the model has no nn.Linear head, so it has no penultimate layer; pass --layer with a "
                                "module name")
        return heads[-1], modules[heads[-1]], True
    for name in (layer, f"net.{layer}"):
        if name and name in modules:
            return name, modules[name], False
    inner = modules.get("net", model)
    shown = ", ".join(f"net.{n}" if "net" in modules else n for n, _ in inner.named_children())
    raise MapPruneError(f"--layer {layer!r} is not a module of the model; give {PENULTIMATE} or a module name "
                        f"(top-level: {shown}; deeper ones as printed by print(model))")


@torch.no_grad()
def extract_features(model: nn.Module, images: torch.Tensor, layer: str = PENULTIMATE, *, batch_size: int = 256,
                     device=None) -> np.ndarray:
    """(N, D) float64 features of uint8 ``images`` at ``layer`` (see :func:`resolve_layer`), the model in eval mode;
    the model's training mode is restored afterwards."""
    _, module, take_input = resolve_layer(model, layer)
    dev = pick_device(device) if device is not None else next(model.parameters()).device
    box: list[torch.Tensor] = []

    def hook(name, mod, inputs, output):
        box.append((inputs[0] if take_input else output).detach().flatten(1).double().cpu())

    was_training = model.training
    model.eval()
    try:
        with forward_hooks({layer: module}, hook):
            for i in range(0, len(images), batch_size):
                model(images[i:i + batch_size].to(dev).float().div_(255))
    finally:
        model.train(was_training)
    if not box:
        return np.zeros((0, 0))
    return torch.cat(box).numpy()


@dataclass
class SampleData:
    """What a sample detector reads. ``labels``: (N,) the labels the model was trained with; ``images``: (N, C, H, W)
    uint8 training images as trained; ``fit_*`` / ``cal_*``: the defender's clean images for statistics and for
    thresholds; ``fit_positions``: where the fit images' indices sit in the training set (their trained versions
    are left out where a method must not count an image twice). Features come from ``model`` at ``layer``, or are
    given directly (:meth:`from_features`, for synthetic tests)."""

    labels: np.ndarray
    num_classes: int
    model: nn.Module | None = None
    images: torch.Tensor | None = None
    fit_images: torch.Tensor | None = None
    fit_labels: np.ndarray | None = None
    cal_images: torch.Tensor | None = None
    cal_labels: np.ndarray | None = None
    fit_positions: np.ndarray | None = None
    layer: str = PENULTIMATE
    device: str | None = None
    _features: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        for name in ("fit_labels", "cal_labels", "fit_positions"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, np.asarray(value, dtype=np.int64).reshape(-1))
        if len(self.labels) == 0:
            raise MapPruneError("a sample detector needs at least one training image")
        if self.labels.min() < 0 or self.labels.max() >= self.num_classes:
            raise MapPruneError(f"training labels must lie in [0, {self.num_classes - 1}]")

    @classmethod
    def from_features(cls, features, labels, num_classes: int | None = None, *, fit_features=None, fit_labels=None,
                      cal_features=None, cal_labels=None, fit_positions=None) -> "SampleData":
        """Data whose features are given (no model): every detector but the FMT-guided one runs on it."""
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        k = int(num_classes if num_classes is not None else labels.max() + 1)
        data = cls(labels, k, fit_labels=fit_labels, cal_labels=cal_labels, fit_positions=fit_positions)
        for part, f in (("train", features), ("fit", fit_features), ("cal", cal_features)):
            if f is not None:
                data._features[part] = np.asarray(f, dtype=np.float64).reshape(len(f), -1)
        if len(data._features["train"]) != len(labels):
            raise MapPruneError(f"need one label per feature row, got {len(data._features['train'])} rows and "
                                f"{len(labels)} labels")
        return data

    @property
    def n(self) -> int:
        return len(self.labels)

    def has(self, part: str) -> bool:
        """Whether ``part`` (train, fit, cal) is there, as images or as features."""
        if part in self._features:
            return True
        images = {"train": self.images, "fit": self.fit_images, "cal": self.cal_images}[part]
        return images is not None and self.model is not None

    def part_labels(self, part: str) -> np.ndarray:
        labels = {"train": self.labels, "fit": self.fit_labels, "cal": self.cal_labels}[part]
        if labels is None:
            raise MapPruneError(f"the {part} images' labels are missing")
        return labels

    def features(self, part: str = "train") -> np.ndarray:
        """(n, D) float64 features of ``part`` at ``self.layer``, computed once."""
        if part not in self._features:
            images = {"train": self.images, "fit": self.fit_images, "cal": self.cal_images}[part]
            if images is None or self.model is None:
                raise MapPruneError(f"this detector needs the {part} images' features; the data holds neither them "
                                    "nor a model and images to compute them")
            self._features[part] = extract_features(self.model, images, self.layer, device=self.device)
        return self._features[part]


# -- results ------------------------------------------------------------------------------------------------------
@dataclass
class SampleDetection:
    """What a sample detector found. ``scores``: (N,) float64, higher = more suspicious (``class_conditional``: they
    compare only inside one class); ``flags``: rule name -> (N,) bool; ``rule``: the rule whose flags are the
    detector's answer; ``class_statistic``: one value per class (what the method ranks classes by), with the
    ``suspected_target``; ``details``: the method's own JSON-ready record (chosen dimensions, thresholds, ...)."""

    scores: np.ndarray
    flags: dict[str, np.ndarray]
    rule: str
    class_statistic: list[float] | None = None
    suspected_target: int | None = None
    class_conditional: bool = True
    details: dict = field(default_factory=dict)

    @property
    def flagged(self) -> np.ndarray:
        """Positions flagged by the detector's own rule, ascending."""
        return np.flatnonzero(self.flags[self.rule])

    def comparable_scores(self, labels: np.ndarray) -> np.ndarray:
        """Scores comparable across classes: a robust z-score inside each class for a class-conditional detector,
        the scores as they are otherwise."""
        if not self.class_conditional:
            return np.asarray(self.scores, dtype=np.float64)
        out = np.zeros(len(self.scores))
        for c in np.unique(labels):
            at = labels == c
            out[at] = robust_z(self.scores[at])
        return out


class SampleDetector:
    """Base class of the sample detectors. A subclass sets ``name``, takes its settings as keyword arguments (checked
    in ``__init__``, so a bad one is refused before any work) and implements :meth:`analyse`; :meth:`detect` adds
    the common ``"expected"`` rule to what it returns."""

    name: ClassVar[str] = "detector"
    paper: ClassVar[str] = ""  # authors, venue, year
    needs: ClassVar[tuple[str, ...]] = ("train",)  # the parts of the data it reads: train, fit, cal, model

    def __init__(self, *, expected: float = 0.1, seed: int = 0):
        check_expected(expected)
        self.expected = float(expected)
        self.seed = int(seed)

    def params(self) -> dict:
        """The detector's settings, as recorded in result.json."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def analyse(self, data: SampleData) -> SampleDetection:
        """The method itself: scores, its own rules' flags, class statistic and suspected target."""
        raise NotImplementedError

    def detect(self, data: SampleData) -> SampleDetection:
        """Runs the detector on ``data``; the detection holds the method's rules and ``"expected"``."""
        missing = [p for p in self.needs if p != "model" and not data.has(p)]
        if "model" in self.needs and data.model is None:
            missing.append("model")
        if missing:
            raise MapPruneError(f"the {self.name} detector needs the {', '.join(missing)} part(s) of the data")
        # numpy's BLAS gets as many threads as torch (--threads): on a shared machine its default (every core)
        # makes the many small eigendecompositions here an order of magnitude slower, not faster
        with threadpool_limits(limits=torch.get_num_threads(), user_api="blas"):
            detection = self.analyse(data)
        comparable = detection.comparable_scores(data.labels)
        detection.flags["expected"] = top_k_mask(comparable, ceil_count(self.expected * data.n))
        return detection


SAMPLE_DETECTORS = Registry("sample detector", "mapprune.sample_detectors", base=SampleDetector,
                            decorator="SAMPLE_DETECTORS.register")


def create_sample_detector(name: str, **kw) -> SampleDetector:
    """The registered detector ``name`` built with the settings ``kw``, each checked against the type it takes (a
    name it does not take, or a value of another type, is refused in one line)."""
    cls = SAMPLE_DETECTORS.get(name)
    options = check_options(cls, kw, f"the {name} detector")
    try:
        return cls(**options)
    except MapPruneError as e:  # a setting's own check: say whose setting it is
        raise MapPruneError(f"the {name} detector: {e}") from None
