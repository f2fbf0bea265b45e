"""SCAn, statistical contamination analysis (Tang, Wang, Tang, Zhang, "Demon in the Variant: Statistical Analysis of
DNNs for Robust Backdoor Contamination Detection", USENIX Security 2021).

A representation is modelled as r = mu_y + e: an identity mu_y per class, drawn from N(0, S_u), plus a variation e
from N(0, S_e) shared by every class. A class that holds poisons holds two identities (its own, and the trigger's
with the target label), so splitting it in two explains its images much better than one identity does.

1. Global model, on the defender's clean features (centred by their mean), by EM: start from the class means
   (S_u = the covariance of each image's class mean, S_e = the covariance of the residuals); then repeat
   mu_k = S_u (n_k S_u + S_e)^+ sum_{i in k} x_i (the identity's posterior mean), e_i = x_i - mu_{y_i},
   S_u = cov(mu_{y_i}), S_e = cov(e_i), until ||dS_u||_F + ||dS_e||_F < ``tol`` (1e-5) or 100 rounds.
2. Untangling, per class k, on the class's training features together with its clean features (every feature first
   centred by the common mean), in the metric F = pinv(S_e): a two-group split by hard-assignment EM from a seeded
   uniform random split (group means, then each point to the nearer mean), until it is stable or exactly swapped,
   or 100 steps. The statistic J_k = (1/n_k) sum_i [||x_i - mu_bar||_F^2 - ||x_i - mu_g(i)||_F^2], with mu_bar =
   S_u (n_k S_u + S_e)^+ sum_i x_i the one-identity estimate: how much better two identities explain the class.
3. s_k = J_k / max_j J_j; the anomaly index a_k is the robust z-score of s_k among the classes, one-sided (a class
   with an unusually small J is not suspicious); a class is flagged when a_k > ``threshold`` (e^2, the paper's).
4. In a flagged class, the group that holds fewer of the clean images is the poison (a rule that does not care which
   group is larger, so it holds at a 50% poison share).

The continuous score of an image is ||x - mu_clean||_F^2 - ||x - mu_poison||_F^2 inside its class (the clean group is
the one holding more clean images), defined in every class; the per-class statistic is J_k, the suspected target the
class with the largest anomaly index.

Rules: ``anomaly`` (the detector's answer: steps 3 and 4), ``anomaly-e`` (the same at the threshold e, as
backdoor-toolbox sets it: a sensitivity check), ``expected`` (the common rule, :mod:`.base`).

Where ours differs, and why:

- The authors fit the global model on a random tenth of the images whose labels are correct, an oracle; ours fits it
  on the defender's clean subset (``fit``), as BackdoorBench and backdoor-toolbox do with clean test images.
- The clean images are part of the training set: their trained versions are left out of the untangling (an image
  counted twice would pull the split), then scored with the fitted groups like every other image.
- The anomaly index is one-sided (the references take the absolute value), and where the
  MAD of the ten statistics is 0 the mean absolute deviation stands in for it.
- The reference ports count one clean image as inspected (``index > n`` where ``>=`` is meant); ours marks the clean
  images explicitly.
- Everything is vectorised in float64; the references loop over samples.
"""

import math

import numpy as np

from ..errors import MapPruneError
from .base import SampleData, SampleDetection, SampleDetector, one_sided_anomaly

MAX_ROUNDS = 100


def global_model(x: np.ndarray, y: np.ndarray, *, tol: float = 1e-5, rounds: int = MAX_ROUNDS):
    """(S_u, S_e, rounds run) of the two-component model fitted to clean features ``x`` with labels ``y``."""
    x = x - x.mean(0)
    classes, inverse = np.unique(y, return_inverse=True)
    counts = np.bincount(inverse)
    sums = np.zeros((len(classes), x.shape[1]))
    np.add.at(sums, inverse, x)
    mu = sums / counts[:, None]
    s_u = np.atleast_2d(np.cov(mu[inverse], rowvar=False))
    s_e = np.atleast_2d(np.cov(x - mu[inverse], rowvar=False))
    done = 0
    while done < rounds:
        done += 1
        for j, n_j in enumerate(counts):
            mu[j] = s_u @ np.linalg.pinv(n_j * s_u + s_e) @ sums[j]
        new_u = np.atleast_2d(np.cov(mu[inverse], rowvar=False))
        new_e = np.atleast_2d(np.cov(x - mu[inverse], rowvar=False))
        change = np.linalg.norm(new_u - s_u) + np.linalg.norm(new_e - s_e)
        s_u, s_e = new_u, new_e
        if change < tol:
            break
    return s_u, s_e, done


def two_groups(x: np.ndarray, f: np.ndarray, rng: np.random.Generator, rounds: int = MAX_ROUNDS) -> np.ndarray:
    """Group (0 or 1) of each row of ``x`` after hard-assignment EM in the metric ``f``, from a random split."""
    n = len(x)
    group = (rng.random(n) < 0.5).astype(np.int64)
    if n > 1 and group.min() == group.max():
        group[0] = 1 - group[0]
    for _ in range(rounds):
        if group.min() == group.max():
            break
        mu1, mu2 = x[group == 1].mean(0), x[group == 0].mean(0)
        bias = mu1 @ f @ mu1 - mu2 @ f @ mu2
        new = (bias - 2 * x @ f @ (mu1 - mu2) < 0).astype(np.int64)
        if np.array_equal(new, group) or np.array_equal(new, 1 - group):
            group = new
            break
        group = new
    return group


def _sq_dist(x: np.ndarray, mu: np.ndarray, f: np.ndarray) -> np.ndarray:
    d = x - mu
    return ((d @ f) * d).sum(1)


class SCAn(SampleDetector):
    """SCAn: per class, the likelihood gain of two identities over one, under a global model fitted on clean images."""

    name = "scan"
    paper = "Tang, Wang, Tang, Zhang, USENIX Security 2021"
    needs = ("train", "fit")

    def __init__(self, *, expected: float = 0.1, threshold: float = math.e ** 2, tol: float = 1e-5, seed: int = 0):
        super().__init__(expected=expected, seed=seed)
        if not (math.isfinite(threshold) and threshold > 0):
            raise MapPruneError(f"threshold is the anomaly index above which a class is flagged (> 0); got {threshold}")
        if not (math.isfinite(tol) and tol > 0):
            raise MapPruneError(f"tol is the EM's stopping change (> 0); got {tol}")
        self.threshold, self.tol = float(threshold), float(tol)

    def analyse(self, data: SampleData) -> SampleDetection:
        train, labels = data.features("train"), data.labels
        clean, clean_labels = data.features("fit"), data.part_labels("fit")
        if len(np.unique(clean_labels)) < 2:
            raise MapPruneError("SCAn's global model needs clean images of at least two classes")
        s_u, s_e, rounds = global_model(clean, clean_labels, tol=self.tol)
        f = np.linalg.pinv(s_e)
        centre = np.concatenate([train, clean]).mean(0)
        train, clean = train - centre, clean - centre
        counted = np.ones(data.n, dtype=bool)
        if data.fit_positions is not None:
            counted[data.fit_positions] = False
        rng = np.random.default_rng(self.seed)
        k = data.num_classes
        stat = np.zeros(k)
        scores = np.zeros(data.n)
        poison_side = np.zeros(data.n, dtype=bool)
        per_class = []
        for c in range(k):
            at = np.flatnonzero(labels == c)
            inspected = at[counted[at]]
            x = np.concatenate([train[inspected], clean[clean_labels == c]])
            is_clean = np.r_[np.zeros(len(inspected), dtype=bool), np.ones(int((clean_labels == c).sum()), dtype=bool)]
            if len(x) < 2:
                per_class.append({"class": c, "images": len(at)})
                continue
            group = two_groups(x, f, rng)
            if group.min() == group.max():  # one group: nothing to untangle
                per_class.append({"class": c, "images": len(at), "groups": [len(x), 0]})
                continue
            mus = [x[group == g].mean(0) for g in (0, 1)]
            mu_bar = s_u @ np.linalg.pinv(len(x) * s_u + s_e) @ x.sum(0)
            stat[c] = float(np.mean(_sq_dist(x, mu_bar, f) - _sq_dist(x, np.where(group[:, None] == 1, mus[1], mus[0]),
                                                                       f)))
            clean_in = [int((is_clean & (group == g)).sum()) for g in (0, 1)]
            sizes = [int((group == g).sum()) for g in (0, 1)]
            if clean_in[0] != clean_in[1]:
                poison = int(np.argmin(clean_in))
            else:  # no clean image tells the groups apart: the smaller group is the suspect
                poison = int(np.argmin(sizes))
            scores[at] = _sq_dist(train[at], mus[1 - poison], f) - _sq_dist(train[at], mus[poison], f)
            poison_side[at] = scores[at] > 0
            per_class.append({"class": c, "images": len(at), "groups": sizes, "clean_in_groups": clean_in,
                              "poison_group": poison})
        top = stat.max()
        relative = stat / top if top > 0 else np.zeros(k)
        anomaly = one_sided_anomaly(relative)
        flags = {}
        for rule, level in (("anomaly", self.threshold), ("anomaly-e", math.e)):
            flags[rule] = poison_side & np.isin(labels, np.flatnonzero(anomaly > level))
        target = int(np.argmax(anomaly)) if anomaly.max() > 0 else int(np.argmax(stat))
        return SampleDetection(scores, flags, "anomaly", [round(float(s), 6) for s in stat], target, True,
                               {"statistic": "J_k (two identities over one)",
                                "anomaly_index": [round(float(a), 4) for a in anomaly],
                                "flagged_classes": np.flatnonzero(anomaly > self.threshold).tolist(),
                                "global_model_rounds": rounds, "classes": per_class})
