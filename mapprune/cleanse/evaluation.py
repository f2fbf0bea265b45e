"""A sample detection measured against the poisons a run records: for evaluation only, never read by a detector.

AUROC from the scores, globally (class-conditional scores made comparable by a robust z-score inside each class,
docs/cleanse.md) and inside the true target class; and, for every rule, what its flags caught: TPR
(poisons flagged / poisons), FPR (clean images flagged / clean images), precision and counts. Images outside
``scored`` (the defender's clean subset, whose clean originals the defender holds) count in neither.
"""

import numpy as np
from sklearn.metrics import roc_auc_score

from .base import SampleDetection


def auroc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """Area under the ROC curve of ``scores`` for the ``positive`` mask; None where one side is empty."""
    positive = np.asarray(positive, dtype=bool)
    if positive.all() or not positive.any():
        return None
    return float(roc_auc_score(positive, scores))


def _ratio(a: int, b: int) -> float | None:
    return a / b if b else None


def measure(detection: SampleDetection, labels: np.ndarray, poisoned: np.ndarray, scored: np.ndarray | None = None,
            target: int | None = None) -> dict:
    """{"poisons", "clean", "auroc", "auroc_target", "rules": {rule: {"flagged", "tp", "fp", "tpr", "fpr",
    "precision"}}} of ``detection`` against the ``poisoned`` mask, over the ``scored`` images (all when None);
    ``target``: the attack's target class, for the AUROC inside it (None: not measured)."""
    labels = np.asarray(labels)
    poisoned = np.asarray(poisoned, dtype=bool)
    scored = np.ones(len(labels), dtype=bool) if scored is None else np.asarray(scored, dtype=bool)
    comparable = detection.comparable_scores(labels)
    pos, neg = int((poisoned & scored).sum()), int((~poisoned & scored).sum())
    out = {"poisons": pos, "clean": neg, "auroc": auroc(comparable[scored], poisoned[scored]), "auroc_target": None,
           "rules": {}}
    if target is not None:
        inside = scored & (labels == target)
        out["auroc_target"] = auroc(np.asarray(detection.scores)[inside], poisoned[inside])
    for rule, flags in detection.flags.items():
        hit = flags & scored
        tp, fp = int((hit & poisoned).sum()), int((hit & ~poisoned).sum())
        out["rules"][rule] = {"flagged": int(hit.sum()), "tp": tp, "fp": fp, "tpr": _ratio(tp, pos),
                              "fpr": _ratio(fp, neg), "precision": _ratio(tp, tp + fp)}
    return out
