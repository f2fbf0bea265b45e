"""A model with an input detector in front: ``GuardedModel(model, detector)(images) -> (logits, flags)``.

The detector must be fitted and calibrated (:meth:`GuardedModel.build` does both from the defender's clean images,
split into the images it learns from and the images that set the threshold). Each call runs the detector's
forward passes per image, the bare prediction among them (``forward_passes``): 1 for the FMT-guided detector, whose
score comes out of the model's own pass through hooks; 6 for SCALE-UP and IBD-PSC; 76 for TeCo; 101 for STRIP at
its default 100 overlays. ``benchmarks/guard_overhead.py`` measures the time per image beside the bare model's.
"""

import torch
from torch import nn

from ..errors import MapPruneError
from .base import InputDetector


class GuardedModel(nn.Module):
    """``model`` (taking [0, 1] pixels) behind ``detector`` (fitted and calibrated). ``forward(images)`` returns
    (the model's logits, or its predicted labels with ``labels=True``; a bool flag per image, True where the
    detector's score is above its calibrated threshold). The last call's scores stay in ``last_scores``."""

    def __init__(self, model: nn.Module, detector: InputDetector, *, labels: bool = False):
        super().__init__()
        if not detector.fitted or detector.threshold is None:
            raise MapPruneError(f"the {detector.name} detector must be fitted and calibrated before it guards a model: "
                                "use GuardedModel.build(model, detector, fit_images, fit_labels, calibration_images)")
        self.model, self.detector, self.labels = model, detector, labels
        self.last_scores: torch.Tensor | None = None

    @classmethod
    def build(cls, model: nn.Module, detector: InputDetector, fit_images, fit_labels, calibration_images, *,
              fpr: float = 0.05, labels: bool = False) -> "GuardedModel":
        """Fits ``detector`` on the clean fit images, sets its threshold at ``fpr`` on the clean calibration images
        (other images than the fit ones), and wraps ``model``."""
        detector.fit(model, fit_images, fit_labels)
        detector.calibrate(model, calibration_images, fpr)
        return cls(model, detector, labels=labels)

    @property
    def forward_passes(self) -> int:
        """The model's forward passes per image a call costs (the bare prediction included)."""
        return self.detector.forward_passes()

    def forward(self, images) -> tuple[torch.Tensor, torch.Tensor]:
        logits, scores = self.detector.predict_and_score(self.model, images)
        self.last_scores = scores
        return (logits.argmax(1) if self.labels else logits), self.detector.flags(scores)
