"""Orderings of the feature maps and how they are judged: AUROC against the ground truth, rank correlation,
precision and recall at the pruning budget, and cumulative pruning curves ASR(k), ACC(k) without fine-tuning."""

import math

import torch
from torch import nn

from .truth import SingleMapPruner, rates


def auroc(scores: torch.Tensor, positive: torch.Tensor) -> float | None:
    """Area under the ROC curve of ``scores`` (higher = positive) with average ranks for ties (Mann-Whitney)."""
    pos = positive.bool()
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = _average_ranks(scores.double())
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _average_ranks(s: torch.Tensor) -> torch.Tensor:
    order = torch.argsort(s, stable=True)
    sorted_s = s[order]
    ranks = torch.empty_like(s)
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = _average_ranks(a.double()), _average_ranks(b.double())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / den) if den > 0 else 0.0


def ordering(values: torch.Tensor) -> list[int]:
    """Flat map indices, most suspicious first (ties by position, so orderings are deterministic)."""
    return torch.argsort(-values.double(), stable=True).tolist()


def as_pruned(index: list[tuple[str, int]], flat: list[int]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for i in flat:
        name, c = index[i]
        out.setdefault(name, []).append(c)
    return {k: sorted(v) for k, v in out.items()}


def pruning_curve(model: nn.Module, index, order: list[int], ks: list[int], xc, yc, xt, yt) -> list[dict]:
    """ACC and ASR after pruning the first k maps of ``order`` (no fine-tune), for each k."""
    pruner = SingleMapPruner(model, xc[:1].to(next(model.parameters()).device).float() / 255)
    saved, done, curve = [], 0, []
    try:
        for k in sorted(ks):
            for i in order[done:k]:
                saved += pruner.ablate(*index[i])
            done = max(done, k)
            acc, asr = rates(model, xc, yc, xt, yt)
            curve.append({"k": k, "acc": acc, "asr": asr})
    finally:
        pruner.restore(saved[::-1])
    return curve


def scorer_metrics(values: torch.Tensor, d_asr: torch.Tensor, causal: torch.Tensor, responsive: torch.Tensor,
                    budget: int) -> dict:
    top = torch.zeros(len(values), dtype=torch.bool)
    top[ordering(values)[:budget]] = True
    hits = int((top & causal).sum())
    return {"auroc_causal": auroc(values, causal), "auroc_response": auroc(values, responsive),
            f"precision@{budget}": hits / budget, f"recall@{budget}": hits / int(causal.sum()) if causal.any() else None,
            "spearman_d_asr": spearman(values, d_asr)}
