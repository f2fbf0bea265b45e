"""Selection rules: which feature maps to prune given per-layer scores (accuracy under per-map attack; low =
suspicious). One registry, ``SELECTIONS``; every rule returns {layer name: sorted channel indices}.
"""

import math

import numpy as np
import torch

from ..errors import MapPruneError, unknown_name
from ..probes.pull import robust_z


def _lowest(scores: torch.Tensor, k: int) -> list[int]:
    # Stable sort: ties are broken by channel index, so the selection is deterministic.
    order = torch.sort(scores, stable=True).indices
    return sorted(order[:k].tolist())


def select_rank(scores: dict[str, torch.Tensor], *, fraction: float = 1 / 64, min_per_layer: int = 1,
                **_) -> dict[str, list[int]]:
    """The ICLR rule: per layer, the lowest floor(C * fraction) maps (fraction 1/64: 1 of 64 ... 8 of 512).

    Layers narrower than 1/fraction would prune nothing under the paper's rule; ``min_per_layer`` (default 1)
    prunes at least that many there, so a width-16 PreActResNet18 still loses its worst map in every layer.
    For layers with C >= 64 at the default fraction this is exactly the paper's count. Set it to 0 for the
    paper's rule verbatim.
    """
    if not 0 < fraction < 1:
        raise MapPruneError(f"rank fraction must be in (0, 1), got {fraction}")
    out = {}
    for name, s in scores.items():
        k = min(len(s) - 1, max(min_per_layer, math.floor(len(s) * fraction)))
        out[name] = _lowest(s, max(0, k))
    return out


def _low_outliers_mad(s: np.ndarray, threshold: float) -> np.ndarray:
    med = np.median(s)
    mad = np.median(np.abs(s - med))
    if mad == 0:
        # More than half the maps share one score: measure spread by the mean absolute deviation instead.
        mad = np.mean(np.abs(s - med)) / 0.7979  # mean-abs-dev of a normal = 0.7979 sigma
        if mad == 0:
            return np.zeros(len(s), dtype=bool)
        z = (s - med) / mad
    else:
        z = 0.6745 * (s - med) / mad
    return z < -threshold


def _low_outliers_elliptic(s: np.ndarray, contamination: float, seed: int) -> np.ndarray:
    # lazy: scikit-learn takes about a second to import, and only the elliptic selection needs it
    from sklearn.covariance import EllipticEnvelope

    if np.ptp(s) == 0 or len(s) < 4:
        return np.zeros(len(s), dtype=bool)
    # Tiny jitter breaks exact ties (32 images give only 33 score values), which make the covariance singular.
    rng = np.random.default_rng(seed)
    x = (s + rng.normal(0, 1e-6, len(s))).reshape(-1, 1)
    try:
        flagged = EllipticEnvelope(contamination=contamination, random_state=seed).fit(x).predict(x) == -1
    except ValueError:
        return np.zeros(len(s), dtype=bool)
    return flagged & (s < np.median(s))  # only maps whose accuracy is anomalously LOW are suspicious


def select_outlier(scores: dict[str, torch.Tensor], *, method: str = "elliptic", contamination: float = 0.1,
                   threshold: float = 3.5, seed: int = 0, **_) -> dict[str, list[int]]:
    """The rule of the paper's first arXiv version: per-layer outlier detection on the score distribution; only
    low-side outliers are pruned.

    ``method="elliptic"``: scikit-learn's Elliptic Envelope with ``contamination`` (paper: 0.1).
    ``method="mad"``: robust z-score 0.6745 (s - median) / MAD below ``-threshold`` (default 3.5).
    """
    if method not in ("elliptic", "mad"):
        raise MapPruneError(f"unknown outlier method {method!r}; valid: elliptic, mad")
    if not 0 < contamination < 0.5:
        raise MapPruneError(f"contamination must be in (0, 0.5), got {contamination}")
    out = {}
    for name, s in scores.items():
        a = s.double().cpu().numpy()
        flags = _low_outliers_elliptic(a, contamination, seed) if method == "elliptic" else _low_outliers_mad(a, threshold)
        out[name] = np.flatnonzero(flags).tolist()
    return out


def select_global(scores: dict[str, torch.Tensor], *, budget: int = 25, **_) -> dict[str, list[int]]:
    """The ``budget`` lowest scores over all layers at once, compared as within-layer robust z-scores (a layer's
    maps are measured against that layer's median and MAD, since layers differ in how fragile they are);
    never every map of a layer, and never a map that is not below its layer's median (z >= 0: its test found
    nothing against it). Without that rule, tied scores (a probe every map fails alike, as the random start does on
    SSBA's model at some seeds) were broken by layer order, and the whole first conv was pruned."""
    if budget < 0:
        raise MapPruneError(f"global budget must be >= 0, got {budget}")
    names = list(scores)
    z = torch.cat([robust_z(scores[n]) for n in names])
    owner = [(n, c) for n in names for c in range(len(scores[n]))]
    out: dict[str, list[int]] = {n: [] for n in names}
    for i in torch.sort(z, stable=True).indices.tolist():
        if sum(len(v) for v in out.values()) >= budget:
            break
        if z[i] >= 0:
            break  # sorted: nothing after this is below its layer's median either
        n, c = owner[i]
        if len(out[n]) < len(scores[n]) - 1:
            out[n].append(c)
    return {n: sorted(v) for n, v in out.items()}


SELECTIONS = {"rank": select_rank, "outlier": select_outlier, "global": select_global}


def select(rule: str, scores: dict[str, torch.Tensor], **kw) -> dict[str, list[int]]:
    if rule not in SELECTIONS:
        raise unknown_name("selection rule", rule, SELECTIONS)
    return SELECTIONS[rule](scores, **kw)
