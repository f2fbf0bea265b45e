"""Spectral Signatures (Tran, Li, Madry, "Spectral Signatures in Backdoor Attacks", NeurIPS 2018).

Poisoned images that share a trigger leave a common direction in the learned representation of their (target)
label: the top singular vector of the class's centred features. Per class y, with R the (n_y x D) features of the
images labelled y and R' = R - mean(R):

1. v = the top right singular vector of R';
2. each image's score is its squared projection on v, (R'_i . v)^2 (the sign of v is arbitrary);
3. the paper's Algorithm 1 removes the ``removal`` (1.5) x eps x n_y highest-scoring images of every class, then
   retrains on the rest.

Defaults: the penultimate features (the paper's own code takes a late internal block; ``--layer`` picks another),
``removal`` 1.5, eps = ``expected`` (0.1). Computed in float64.

Rules (each a flag set in the detection; none reads the ground truth):

- ``every-class`` (the detector's answer): the paper's Algorithm 1 with eps the declared share, in every class the
  ceil(1.5 eps n_y) highest scores, at most half the class (a class cannot lose more than half of itself to a
  removal meant for a minority; this cap is the one backdoor-toolbox applies);
- ``target``: the class whose top singular value holds the largest share of its spectrum (s_1^2 / sum s^2, the
  per-class statistic) by a one-sided robust z-score among the classes is the suspected target; only there, the
  1.5 x (declared count bound of one class: min(eps N, n_y)) highest scores, at most half the class;
- ``expected``: the common rule of every detector (:mod:`.base`).

Where ours differs, and why:

- The paper gives the rule for a known poison fraction eps per class; here eps is the declared bound (``expected``),
  the same for every detector, never the attack's real rate.
- ``centred=False`` scores |r . v| with the uncentred r, as the authors' TensorFlow code and BackdoorBench do; the
  default is the centred square the algorithm states.
- The ``target`` rule and the half-class cap are toolkit rules: with the toolkit's
  default attack the target class is about half poison, where 1.5 x eps x n_y removes too few.
"""

import math

import numpy as np

from ..errors import MapPruneError
from .base import (
    SampleData,
    SampleDetection,
    SampleDetector,
    ceil_count,
    class_count_bound,
    one_sided_anomaly,
    top_k_mask,
)


def spectral_scores(features: np.ndarray, centred: bool = True) -> tuple[np.ndarray, float]:
    """(per-row score, share of the top singular value in the spectrum) of one class's (n, D) ``features``."""
    x = np.asarray(features, dtype=np.float64)
    if len(x) < 2:
        return np.zeros(len(x)), 0.0
    xc = x - x.mean(0)
    _, s, vt = np.linalg.svd(xc, full_matrices=False)
    total = float((s ** 2).sum())
    share = float(s[0] ** 2 / total) if total > 0 else 0.0
    if centred:
        return (xc @ vt[0]) ** 2, share
    return np.abs(x @ vt[0]), share


class SpectralSignatures(SampleDetector):
    """Spectral Signatures: each image's squared projection on its class's top singular vector."""

    name = "ss"
    paper = "Tran, Li, Madry, NeurIPS 2018"

    def __init__(self, *, expected: float = 0.1, removal: float = 1.5, centred: bool = True, seed: int = 0):
        super().__init__(expected=expected, seed=seed)
        if not (math.isfinite(removal) and removal > 0):
            raise MapPruneError(f"removal is the multiple of the declared share removed per class (> 0); got {removal}")
        self.removal = float(removal)
        self.centred = bool(centred)

    def analyse(self, data: SampleData) -> SampleDetection:
        feats, labels = data.features("train"), data.labels
        scores = np.zeros(data.n)
        share = np.zeros(data.num_classes)
        for c in range(data.num_classes):
            at = labels == c
            if at.any():
                scores[at], share[c] = spectral_scores(feats[at], self.centred)
        anomaly = one_sided_anomaly(share)
        target = int(np.argmax(anomaly)) if anomaly.max() > 0 else int(np.argmax(share))
        every = np.zeros(data.n, dtype=bool)
        for c in range(data.num_classes):
            at = labels == c
            n_c = int(at.sum())
            every |= top_k_mask(scores, min(ceil_count(self.removal * self.expected * n_c), n_c // 2), at)
        at = labels == target
        n_t = int(at.sum())
        k_t = min(ceil_count(self.removal * class_count_bound(self.expected, data.n, n_t)), n_t // 2)
        flags = {"every-class": every, "target": top_k_mask(scores, k_t, at)}
        return SampleDetection(scores, flags, "every-class", [round(float(s), 6) for s in share], target, True,
                               {"statistic": "top singular value's share of the class's spectrum",
                                "anomaly_index": [round(float(a), 4) for a in anomaly], "target_removed": k_t})
