"""MM-BD (Wang, Xiang, Miller, Kesidis, IEEE S&P 2024): is this model backdoored? Data-free, no trigger needed.

A backdoor's target class can be reached from any input by a small pattern, so the largest logit margin
``logit_c - max_{k != c} logit_k`` an input can reach is abnormally large for the target. For every class c:
``images`` (30) uniform-random images, each optimised by gradient ascent on its margin for c (the model sees the
images clamped to [0, 1]) for at most ``steps`` (300) SGD steps at ``lr`` 0.01, stopping when the summed margin
changes by less than ``tolerance`` (1e-5, relative) from one step to the next; the class's statistic is the largest
margin among its images at the last step. A Gamma distribution (shape, location and scale, as scipy fits it) is
fitted to the other K - 1 statistics, and the largest statistic's p-value is ``1 - F(r_max)^K`` (the chance that
the largest of K draws is at least that large). The model is flagged when p <= ``alpha`` (0.05); the suspected
target is the class of the largest statistic.

Where ours differs from the authors' code (wanghangpsu/MM-BD, univ_bd.py), and why:
- Their loop rebuilds its SGD optimiser at every step, so its momentum (0.2) never acts; ours keeps one optimiser
  with momentum 0.2, which is what the settings state.
- Their loop hard-codes 10 classes; ours takes the model's class count.
- All classes are optimised in one batch (K x 30 images) instead of one class after another, so the stopping test
  reads the sum over all classes' margins; each image's arithmetic is the same.
- Where the Gamma fit fails (equal statistics), the p-value is 0 if the largest statistic exceeds the others,
  else 1.
The model gets raw [0, 1] pixels: mapprune's models hold their normalisation inside (``Normalized``).
"""

import math
import time

import torch
from scipy import stats
from torch import nn

from ..errors import MapPruneError


def mmbd(model: nn.Module, num_classes: int, image_shape, *, images: int = 30, steps: int = 300, lr: float = 0.01,
         momentum: float = 0.2, tolerance: float = 1e-5, alpha: float = 0.05, seed: int = 0, device=None) -> dict:
    """Runs MM-BD on ``model``; returns {"statistics", "target", "p_value", "score" (-log10 p), "flagged",
    "steps", "seconds"}."""
    if num_classes < 3:
        raise MapPruneError(f"MM-BD fits a null to the other classes' statistics; it needs >= 3 classes, got "
                            f"{num_classes}")
    if images < 1 or steps < 1 or not lr > 0 or not 0 < alpha < 1:
        raise MapPruneError(f"MM-BD needs images >= 1, steps >= 1, lr > 0 and alpha in (0, 1); got {images}, {steps}, "
                            f"{lr}, {alpha}")
    t0 = time.perf_counter()
    device = device or next(model.parameters()).device
    model = model.eval()
    was = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(num_classes * images, *image_shape, generator=g).to(device).requires_grad_(True)
    cls = torch.arange(num_classes, device=device).repeat_interleave(images)
    opt = torch.optim.SGD([x], lr=lr, momentum=momentum)
    previous, done = None, steps
    try:
        for step in range(steps + 1):
            logits = model(x.clamp(0, 1))
            own = logits.gather(1, cls[:, None])[:, 0]
            margin = own - logits.scatter(1, cls[:, None], -math.inf).amax(1)
            total = float(margin.detach().sum())
            converged = previous is not None and abs(total - previous) <= tolerance * max(abs(previous), 1e-12)
            if step == steps or converged:
                done = step
                break
            previous = total
            opt.zero_grad()
            (-margin.sum()).backward()
            opt.step()
    finally:
        for p, w in zip(model.parameters(), was):
            p.requires_grad_(w)
    best = margin.detach()
    statistic = best.view(num_classes, images).amax(1).cpu().double()
    target = int(statistic.argmax())
    p_value = _p_value(statistic, target)
    return {"statistics": [round(float(s), 4) for s in statistic], "target": target, "p_value": p_value,
            "score": -math.log10(max(p_value, 1e-300)), "flagged": p_value <= alpha, "alpha": alpha, "steps": done,
            "seconds": round(time.perf_counter() - t0, 2)}


def _p_value(statistic: torch.Tensor, target: int) -> float:
    """1 - F(r_max)^K with F the Gamma fitted to the other classes' statistics."""
    k = len(statistic)
    rest = torch.cat([statistic[:target], statistic[target + 1:]]).numpy()
    r_max = float(statistic[target])
    if float(rest.std()) < 1e-9:  # every other class the same: any larger maximum is an outlier
        return 0.0 if r_max > float(rest.max()) + 1e-9 else 1.0
    try:
        a, loc, scale = stats.gamma.fit(rest)
        cdf = float(stats.gamma.cdf(r_max, a, loc=loc, scale=scale))
    except (ValueError, RuntimeError, FloatingPointError):
        return 0.0 if r_max > float(rest.max()) else 1.0
    if not math.isfinite(cdf):
        return 0.0 if r_max > float(rest.max()) else 1.0
    return float(min(1.0, max(0.0, 1 - cdf ** k)))
