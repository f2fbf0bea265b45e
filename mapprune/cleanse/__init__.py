"""Poisoned-training-sample detection: one detector per file behind one protocol (:mod:`.base`), one registry.

``create_sample_detector(name, **settings).detect(SampleData(...))`` returns a :class:`SampleDetection`: a score
per training image, the images flagged by ground-truth-free rules, a per-class statistic and the suspected target.
:func:`.evaluation.measure` scores a detection against a run's recorded poisons (for evaluation only).

- ``ss``: Spectral Signatures (:mod:`.spectral`);
- ``ac``: Activation Clustering (:mod:`.activation_clustering`);
- ``spectre``: SPECTRE (:mod:`.spectre`);
- ``scan``: SCAn (:mod:`.scan_detector`);
- ``fmt``: the FMT-guided detector (:mod:`.fmt_guided`).

A detector of one's own registers with ``@SAMPLE_DETECTORS.register`` on a :class:`SampleDetector` subclass with a
``name`` of its own, or through the ``mapprune.sample_detectors`` entry-point group of an installed package.
"""

from .activation_clustering import ActivationClustering
from .base import (
    PENULTIMATE,
    SAMPLE_DETECTORS,
    SampleData,
    SampleDetection,
    SampleDetector,
    create_sample_detector,
    extract_features,
    resolve_layer,
    robust_z,
)
from .evaluation import measure
from .fmt_guided import FMTGuided
from .scan_detector import SCAn
from .spectral import SpectralSignatures
from .spectre import Spectre

# In the order `mapprune cleanse --detector all` runs them and the docs list them.
for _cls in (SpectralSignatures, ActivationClustering, Spectre, SCAn, FMTGuided):
    SAMPLE_DETECTORS.register(_cls)
del _cls

__all__ = ["PENULTIMATE", "SAMPLE_DETECTORS", "ActivationClustering", "FMTGuided", "SCAn", "SampleData",
           "SampleDetection", "SampleDetector", "Spectre", "SpectralSignatures", "create_sample_detector",
           "extract_features", "measure", "resolve_layer", "robust_z"]
