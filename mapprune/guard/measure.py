"""How well an input detector separates triggered from clean inputs: AUROC, and the rates at a threshold."""

import torch
from scipy import stats


def auroc(positive: torch.Tensor, negative: torch.Tensor) -> float | None:
    """P(a positive's score > a negative's), ties counting half (Mann-Whitney on average ranks); None when either
    side is empty."""
    pos = torch.as_tensor(positive).detach().double().flatten().cpu()
    neg = torch.as_tensor(negative).detach().double().flatten().cpu()
    if len(pos) == 0 or len(neg) == 0:
        return None
    ranks = torch.from_numpy(stats.rankdata(torch.cat([pos, neg]).numpy()))
    return float((ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def rate(flags: torch.Tensor) -> float | None:
    """The share of True in ``flags``; None when there are none to count."""
    return float(flags.float().mean()) if len(flags) else None


def oracle_tpr_at_fpr(triggered: torch.Tensor, clean: torch.Tensor, fpr: float) -> float | None:
    """The detection rate at the threshold read off the test ROC itself (the largest clean score kept under
    ``fpr``): an oracle, since it uses the clean test scores; reported beside the calibrated rule, never instead."""
    trig, cln = torch.as_tensor(triggered).double().cpu(), torch.as_tensor(clean).double().cpu()
    if len(trig) == 0 or len(cln) == 0:
        return None
    allowed = int(fpr * len(cln))  # clean test images that may score above the threshold
    threshold = cln.sort(descending=True).values[allowed] if allowed < len(cln) else -float("inf")
    return float((trig > threshold).double().mean())
