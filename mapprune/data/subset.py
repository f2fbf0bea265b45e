"""Class-balanced clean subsets: the defender's few clean images."""

import torch

from ..errors import MapPruneError


def clean_subset(labels: torch.Tensor, ratio: float, seed: int = 0) -> torch.Tensor:
    """Indices of a class-balanced subset holding ``ratio`` of each class (at least one image per class).

    The same (labels, ratio, seed) always gives the same indices, sorted ascending.
    """
    if not 0 < ratio <= 1:
        raise MapPruneError(f"clean ratio must be in (0, 1], got {ratio}")
    g = torch.Generator().manual_seed(seed)
    picked = []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        k = max(1, round(ratio * len(idx)))
        picked.append(idx[torch.randperm(len(idx), generator=g)[:k]])
    return torch.cat(picked).sort().values


def split_holdout(indices: torch.Tensor, labels: torch.Tensor, fraction: float, seed: int = 0):
    """Splits a clean subset into (fit, held_out), class-balanced, for defenses that choose hyperparameters."""
    held = clean_subset(labels[indices], fraction, seed)
    mask = torch.zeros(len(indices), dtype=torch.bool)
    mask[held] = True
    return indices[~mask], indices[mask]
