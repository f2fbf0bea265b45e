"""Reading a map test: from what testing every feature map measured (:class:`~.map_test.MapTest`) to each map's
pull towards each class, the suspected target class, and one suspicion value per map (higher = more suspicious).

- ``accuracy``: the paper's score, the accuracy of the map's stepped images, negated.
- ``target``: how strongly the map's stepped images are pulled towards one class, the suspected target t:
  the mean softmax probability of t on the images whose true class is not t, minus the same on the
  random-direction null. A map whose excitation sends inputs to one class is what a backdoor map looks like;
  a merely fragile map scatters them (ANP, ABS and AEVA all rely on that signature).

Suspicions are compared across layers as within-layer robust z-scores (median / MAD), since layers differ in
how fragile they are in general.
"""

import torch

from ..errors import unknown_name
from .map_test import MapTest

SCORERS = ("accuracy", "target")


def robust_z(s: torch.Tensor) -> torch.Tensor:
    """(s - median) / (1.4826 MAD); the standard deviation stands in where the MAD is 0, and 0 where both are."""
    s = s.double()
    med = s.median()
    scale = 1.4826 * (s - med).abs().median()
    if scale == 0:
        scale = s.std() if len(s) > 1 else torch.zeros((), dtype=s.dtype)
    if scale == 0 or not torch.isfinite(scale):
        return torch.zeros_like(s)
    return (s - med) / scale


def class_pull(test: MapTest) -> torch.Tensor:
    """(maps, K): per map and class j, the mean probability of j on images not of class j, minus the null's."""
    y = test.labels
    k = test.null_probs.shape[1]
    other = torch.stack([(y != j).float() for j in range(k)], 1)  # (n, K)
    denom = other.sum(0).clamp_min(1)
    probs = torch.cat([p for p in test.probs.values()])  # (maps, n, K)
    pulled = (probs * other).sum(1) / denom
    null = (test.null_probs * other).sum(0) / denom
    return pulled - null


def estimate_target(test: MapTest, top: float = 0.02) -> dict:
    """The class the most suspicious maps pull towards, and how anomalous that pull is among the classes
    (:func:`target_from_pull` over :func:`class_pull`)."""
    return target_from_pull(class_pull(test), top)


def target_from_pull(pull: torch.Tensor, top: float = 0.02) -> dict:
    """From a (maps, K) pull of each map towards each class: per class, the mean pull of its ``top`` share of maps
    (the maps that pull hardest to it); the suspected target is the class where that is largest, and its anomaly
    index the robust z-score of it among the K classes (NC and AEVA flag above 2).
    """
    m = max(1, round(top * len(pull)))
    tail = pull.topk(m, dim=0).values.mean(0)  # (K,)
    z = robust_z(tail)
    t = int(tail.argmax())
    return {"target": t, "anomaly_index": float(z[t]), "class_pull": [round(float(v), 6) for v in tail]}


def _split(test: MapTest, flat: torch.Tensor) -> dict[str, torch.Tensor]:
    out, i = {}, 0
    for name, acc in test.acc.items():
        out[name] = flat[i:i + len(acc)]
        i += len(acc)
    return out


def suspicion(test: MapTest, scorer: str, target: int | None = None) -> dict[str, torch.Tensor]:
    """{conv name: (C,) suspicion}, raw (not z-scored); higher = more suspicious."""
    if scorer not in SCORERS:
        raise unknown_name("scorer", scorer, SCORERS)
    if scorer == "accuracy":
        return {name: -acc.double() for name, acc in test.acc.items()}
    if target is None:
        target = estimate_target(test)["target"]
    return _split(test, class_pull(test)[:, target].double())


def layer_z(scores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Within-layer robust z-scores, so one ranking can run over all layers."""
    return {name: robust_z(s) for name, s in scores.items()}
