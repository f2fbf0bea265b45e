"""STRIP (Gao, Xu, Wang, Chen, Ranasinghe, Nepal, "STRIP: A Defence Against Trojan Attacks on Deep Neural
Networks", ACSAC 2019).

A trigger dominates whatever is blended over it, so a triggered input keeps its (target) prediction under strong
blends, while a clean input blended with other images gets uncertain predictions. For an input x, ``overlays``
(100) clean images x_j are drawn and each blend ``clamp(x + alpha * x_j, 0, 1)`` (``alpha`` 1: the paper's
saturating add of the two images) is classified; the entropy of the softmax, averaged over the blends, is H(x).
Low H means triggered; the score is -H (higher is more suspicious).

Cost: 1 + ``overlays`` forward passes per input (the bare prediction and the blends).

Where ours differs, and why:
- The overlays come from the clean images :meth:`fit` gets (the defender's fit split), and the threshold from
  other clean images (the calibration split), so no image both builds and judges the rule (reference code sets its
  threshold on the very clean test images it then evaluates).
- Every input draws its own overlays (without replacement while the fit images suffice); reference code reuses one
  draw for a whole batch. The draw is seeded, so the same inputs always get the same score.
- The threshold is :func:`~mapprune.guard.base.calibrate_threshold`'s rank at the stated false-positive rate; the
  paper fits a normal distribution to the clean entropies and takes its percentile.
- Blends are made on [0, 1] pixels before the model's normalisation (never on normalised tensors).
"""

import torch

from ..errors import MapPruneError
from .base import InputDetector, forward_in_chunks


class STRIP(InputDetector):
    """STRIP's entropy of blended inputs (see the module's docstring)."""

    name = "strip"
    paper = "Gao et al., ACSAC 2019"

    def __init__(self, *, overlays: int = 100, alpha: float = 1.0, batch_size: int = 512, seed: int = 0):
        super().__init__(batch_size=batch_size, seed=seed)
        if overlays < 1 or not 0 < alpha <= 1:
            raise MapPruneError(f"STRIP takes overlays >= 1 and alpha in (0, 1]; got {overlays} and {alpha}")
        self.overlays, self.alpha = overlays, alpha
        self.pool: torch.Tensor | None = None

    def forward_passes(self) -> int:
        return 1 + self.overlays

    def state(self) -> dict:
        return {"overlay_pool": 0 if self.pool is None else len(self.pool)}

    def _fit(self, model, x, y):
        self.pool = x.float()

    def _score(self, model, x, logits, g):
        n, k = len(x), len(self.pool)
        if k >= self.overlays:  # each input its own overlays, none twice
            idx = torch.rand(n, k, generator=g).argsort(1)[:, :self.overlays]
        else:
            idx = torch.randint(0, k, (n, self.overlays), generator=g)
        pool = self.pool.to(x.device)
        blends = (x[:, None] + self.alpha * pool[idx.to(x.device)]).clamp_(0, 1).flatten(0, 1)
        p = forward_in_chunks(model, blends, self.batch_size).float().softmax(1)
        entropy = -(p * p.clamp_min(1e-12).log()).sum(1)
        return -entropy.view(n, self.overlays).mean(1)
