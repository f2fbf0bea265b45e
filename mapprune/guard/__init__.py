"""Input-level backdoor detection: is this input triggered? Detectors that sit in front of a model at inference.

- :mod:`.base`: the protocol (:class:`InputDetector`: ``fit`` on clean images, ``calibrate`` the threshold at a
  false-positive rate on other clean images, ``score`` and ``flags``) and :func:`calibrate_threshold`;
- one file per detector: :mod:`.strip` (STRIP), :mod:`.scale_up` (SCALE-UP), :mod:`.teco` (TeCo, with its
  corruptions in :mod:`.corruptions`), :mod:`.ibd_psc` (IBD-PSC), :mod:`.fmt_guided` (FMT's suspicious maps
  watched at inference);
- :mod:`.wrapper`: :class:`GuardedModel`, a model and a calibrated detector as one module returning
  (prediction, flag);
- :mod:`.measure`: AUROC and rates.

``create_detector(name, **settings)``; a detector of one's own registers with ``@register_detector`` (or through
the ``mapprune.guards`` entry-point group of an installed package).
"""

from ..options import check_options
from ..registry import Registry
from .base import InputDetector, calibrate_threshold, calibration_images_needed
from .fmt_guided import FMTGuided
from .ibd_psc import IBDPSC
from .measure import auroc, oracle_tpr_at_fpr, rate
from .scale_up import ScaleUp
from .strip import STRIP
from .teco import TeCo
from .wrapper import GuardedModel

INPUT_DETECTORS = Registry("input detector", "mapprune.guards", base=InputDetector, decorator="register_detector")
register_detector = INPUT_DETECTORS.register
for _cls in (STRIP, ScaleUp, TeCo, IBDPSC, FMTGuided):
    register_detector(_cls)
del _cls


def detector_class(name: str) -> type[InputDetector]:
    """The registered detector class ``name``; an unknown name is refused, naming the valid ones."""
    return INPUT_DETECTORS.get(name)


def create_detector(name: str, **settings) -> InputDetector:
    """The detector ``name`` with ``settings``; a setting it does not take, or a value of another type, is refused
    naming the valid ones."""
    cls = detector_class(name)
    return cls(**check_options(cls, settings, f"the {name} detector"))


__all__ = ["FMTGuided", "GuardedModel", "IBDPSC", "INPUT_DETECTORS", "InputDetector", "STRIP", "ScaleUp", "TeCo",
           "auroc", "calibrate_threshold", "calibration_images_needed", "create_detector", "detector_class",
           "oracle_tpr_at_fpr", "rate", "register_detector"]
