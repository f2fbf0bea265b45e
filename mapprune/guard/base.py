"""The protocol of an input detector, and the one rule that turns clean scores into a threshold.

An input detector decides, for each image handed to a model, whether it carries a backdoor trigger. It learns
what it needs from clean images the defender holds (:meth:`InputDetector.fit`), gives every input a score where
higher means more suspicious (:meth:`InputDetector.score`), and flags an input whose score is above a threshold set
on other, held-out clean images at a stated false-positive rate (:meth:`InputDetector.calibrate`, through
:func:`calibrate_threshold`). It never sees a trigger, a poisoned image or the target label.

Every perturbation a detector makes (STRIP's blends, SCALE-UP's scaling, TeCo's corruptions) is made on [0, 1]
pixels before the model: mapprune's models hold their normalisation inside (``Normalized``), and so must a user's
model handed to a detector.
"""

import contextlib
import math

import torch
from torch import nn

from ..errors import MapPruneError
from ..images import as_unit
from ..options import keyword_options


def calibrate_threshold(scores: torch.Tensor, fpr: float) -> float:
    """The threshold ``t`` (an input is flagged when its score is above ``t``) set on the scores of ``n`` clean
    calibration images so that a clean input from the same distribution is flagged with probability at most
    ``fpr``: the ``ceil((1 - fpr)(n + 1))``-th smallest calibration score.

    A fresh clean score is equally likely to fall in any of the ``n + 1`` gaps the calibration scores leave, so it
    exceeds the ``r``-th smallest with probability ``(n + 1 - r) / (n + 1) <= fpr`` (the split-conformal rank). The
    plain ``(1 - fpr)`` quantile of the calibration scores lets it through more often on a small set (about
    ``(k + 1) / (n + 1)`` with ``k = floor(fpr n)``: 7.7% for a 5% target on 26 images). Ties at the threshold
    are not flagged, so a score with few distinct values reaches a lower rate than asked; the rate actually reached
    is measured, never assumed. Fewer than ``1 / fpr - 1`` images cannot guarantee the rate: refused in one line.
    """
    s = torch.as_tensor(scores, dtype=torch.float64).flatten()
    if not 0 < fpr < 1:
        raise MapPruneError(f"the false-positive rate is a fraction in (0, 1), got {fpr}")
    if len(s) == 0 or not torch.isfinite(s).all():
        raise MapPruneError("calibration needs at least one clean score, every one finite")
    n = len(s)
    rank = math.ceil((1 - fpr) * (n + 1) - 1e-9)  # the tolerance keeps 0.95 * 20 from rounding up to 20.000001
    if rank > n:
        raise MapPruneError(f"{n} clean calibration images cannot hold a false-positive rate of {fpr:g}: that needs "
                            f"at least {calibration_images_needed(fpr)}; raise the rate or use more clean images")
    return float(s.sort().values[rank - 1])


def calibration_images_needed(fpr: float) -> int:
    """The fewest calibration images for which :func:`calibrate_threshold` can hold ``fpr``."""
    return math.ceil(1 / fpr - 1 - 1e-9)


@contextlib.contextmanager
def evaluating(model: nn.Module):
    """``model`` in eval mode (BatchNorm running statistics) for the block, its own mode restored after."""
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)


def model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def forward_in_chunks(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``model(x)`` computed ``batch_size`` images at a time (the perturbed copies of a chunk of inputs can be many
    times the chunk)."""
    return torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


class InputDetector:
    """The base of every input detector: its settings are keyword arguments of ``__init__`` (recorded by
    :meth:`settings`), ``fit`` learns from clean images, ``calibrate`` sets the threshold at a false-positive rate
    on other clean images, ``score``/``predict_and_score``/``flags`` judge inputs.

    A subclass sets ``name``, ``paper`` and, where the method publishes a fixed rule on its score,
    ``published_threshold`` (flag at score >= it); it implements :meth:`forward_passes` and ``_score`` (the score of
    a chunk of [0, 1] images, given the bare model's logits on them), and ``_fit`` when it learns from clean data.
    A detector whose score comes out of the bare model's own pass overrides ``_predict_and_score`` instead.
    """

    name: str = ""
    paper: str = ""
    published_threshold: float | None = None

    def __init__(self, *, batch_size: int = 512, seed: int = 0):
        if batch_size < 1:
            raise MapPruneError(f"batch_size is the images per forward pass, at least 1; got {batch_size}")
        self.batch_size, self.seed = batch_size, seed
        self.threshold: float | None = None  # set by calibrate()
        self.fpr: float | None = None
        self.calibration_images = 0
        self.fitted = False

    # -- what the detector is -------------------------------------------------------------------------------
    @classmethod
    def option_names(cls) -> list[str]:
        """The settings the detector takes: the keyword-only arguments of its ``__init__`` chain."""
        return keyword_options(cls, InputDetector)

    def settings(self) -> dict:
        """Each setting's value (as recorded in a report)."""
        return {k: _plain(getattr(self, k)) for k in self.option_names()}

    def forward_passes(self) -> int:
        """Forward passes of the model per input, the bare model's own prediction included."""
        raise NotImplementedError

    def input_chunk(self) -> int:
        """How many inputs are scored together: their perturbed copies make about ``batch_size`` images."""
        return max(1, self.batch_size // self.forward_passes())

    def state(self) -> dict:
        """What :meth:`fit` learned, as plain values for a report (empty for a detector that learns nothing)."""
        return {}

    # -- learning and calibrating -----------------------------------------------------------------------------
    def fit(self, model: nn.Module, images, labels) -> "InputDetector":
        """Learns what the method takes from clean ``images`` (uint8, or floats in [0, 1]) and their ``labels``;
        returns the detector."""
        y = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        x = as_unit(images, y, what="clean images")
        self.threshold, self.fitted = None, False  # a threshold calibrated for another fit does not hold
        with evaluating(model):  # no torch.no_grad here: FMT's testing takes gradients
            self._fit(model, x, y)
        self.fitted = True
        return self

    def _fit(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
        """Nothing to learn by default (a data-free detector)."""

    def calibrate(self, model: nn.Module, images, fpr: float = 0.05) -> float:
        """Sets and returns the threshold at false-positive rate ``fpr`` from the scores of clean ``images`` that
        :meth:`fit` did not see (:func:`calibrate_threshold`)."""
        scores = self.score(model, images)
        self.threshold = calibrate_threshold(scores, fpr)
        self.fpr, self.calibration_images = fpr, len(scores)
        return self.threshold

    # -- judging inputs -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict_and_score(self, model: nn.Module, images) -> tuple[torch.Tensor, torch.Tensor]:
        """(the bare model's logits, each input's score: higher is more suspicious), on the model's device. The
        random draws (overlays, noise) start from ``seed`` at every call, so the same inputs in the same order
        always get the same scores."""
        if not self.fitted:
            raise MapPruneError(f"the {self.name} detector is not fitted: call fit(model, clean_images, labels) first")
        x = as_unit(images, what="images")
        if len(x) == 0:
            raise MapPruneError("no images to score")
        device = model_device(model)
        g = torch.Generator().manual_seed(self.seed)
        chunk = self.input_chunk()
        logits, scores = [], []
        with evaluating(model):
            for i in range(0, len(x), chunk):
                lo, sc = self._predict_and_score(model, x[i:i + chunk].to(device).float(), g)
                logits.append(lo)
                scores.append(sc.float())
        return torch.cat(logits), torch.cat(scores)

    def _predict_and_score(self, model: nn.Module, x: torch.Tensor, g: torch.Generator):
        logits = model(x)
        return logits, self._score(model, x, logits, g)

    def _score(self, model: nn.Module, x: torch.Tensor, logits: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def score(self, model: nn.Module, images) -> torch.Tensor:
        """Each input's score (higher is more suspicious), on the model's device."""
        return self.predict_and_score(model, images)[1]

    def flags(self, scores: torch.Tensor) -> torch.Tensor:
        """Which scores are above the calibrated threshold."""
        if self.threshold is None:
            raise MapPruneError(f"the {self.name} detector has no threshold: call calibrate(model, clean_images, fpr) "
                                "with clean images it was not fitted on")
        return scores > self.threshold

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={v!r}" for k, v in self.settings().items())
        return f"{type(self).__name__}({shown})"


def _plain(v):
    return list(v) if isinstance(v, tuple) else v
