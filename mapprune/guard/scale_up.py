"""SCALE-UP (Guo, Li, Chen, Guo, Sun, Liu, "SCALE-UP: An Efficient Black-box Input-level Backdoor Detection via
Analyzing Scaled Prediction Consistency", ICLR 2023).

Amplifying a triggered image's pixels keeps the trigger's prediction (scaled prediction consistency), while a clean
image's prediction drifts. With ŷ the prediction on x and each n of ``scales`` (3, 5, 7, 9, 11), ŷ_n is the
prediction on ``clip(n x, 0, 1)``; SPC(x) is the share of scales with ŷ_n = ŷ. Only hard labels are used.

``standardize`` (the data-limited setting): ``"class"`` (default) turns SPC into ``(SPC - mu_c) / sigma_c`` with the
mean and standard deviation of SPC over the clean fit images the model predicts as c = ŷ, so a class whose clean
images are scale-robust anyway is not flagged for it; ``"global"`` uses one mean and deviation for all classes;
``"none"`` is the data-free SPC itself, and only then the paper's fixed rule, SPC >= 0.5, applies
(``published_threshold``). The score is that value (higher is more suspicious).

Cost: 1 + len(``scales``) forward passes per input (6 by default).

Where ours differs, and why:
- The class-wise statistics are keyed by the predicted class (the paper's description); the BackdoorBox and
  backdoor-toolbox ports use one global mean and deviation computed against the true labels. A deviation is floored
  at ``MIN_STD`` (half a step of SPC's grid for five scales): a class whose fit images all reach the same SPC would
  otherwise divide by zero. A class with fewer than two fit images predicted as it uses the global statistics.
- The threshold is :func:`~mapprune.guard.base.calibrate_threshold`'s rank at the stated false-positive rate on
  held-out clean images; SPC has only len(scales) + 1 values, so ties make the rate reached lower than asked
  (measured and reported).
- No uniform noise is added before scaling (the official demo adds 0.02 noise; the paper's method does not).
"""

import torch

from ..errors import MapPruneError
from .base import InputDetector, forward_in_chunks, model_device

MIN_STD = 0.1
STANDARDIZE = ("class", "global", "none")


class ScaleUp(InputDetector):
    """SCALE-UP's scaled prediction consistency (see the module's docstring)."""

    name = "scale-up"
    paper = "Guo et al., ICLR 2023"

    def __init__(self, *, scales: tuple = (3, 5, 7, 9, 11), standardize: str = "class", batch_size: int = 512,
                 seed: int = 0):
        super().__init__(batch_size=batch_size, seed=seed)
        try:
            scales = tuple(float(s) for s in scales)
        except (TypeError, ValueError):
            raise MapPruneError(f"SCALE-UP's scales are a list of numbers above 1, got {scales!r}") from None
        if not scales or any(not s > 1 for s in scales):
            raise MapPruneError(f"SCALE-UP's scales are a list of numbers above 1, got {list(scales)}")
        if standardize not in STANDARDIZE:
            raise MapPruneError(f"SCALE-UP's standardize is one of {', '.join(STANDARDIZE)}; got {standardize!r}")
        self.scales, self.standardize = scales, standardize
        self.mean: torch.Tensor | None = None  # per predicted class (the global value where a class has too few)
        self.std: torch.Tensor | None = None
        self.published_threshold = 0.5 if standardize == "none" else None

    def forward_passes(self) -> int:
        return 1 + len(self.scales)

    def state(self) -> dict:
        if self.mean is None:
            return {}
        return {"spc_mean": [round(float(v), 4) for v in self.mean], "spc_std": [round(float(v), 4) for v in self.std]}

    def spc(self, model, x: torch.Tensor, predicted: torch.Tensor) -> torch.Tensor:
        """The share of the scales whose prediction equals ``predicted``, per image of ``x``."""
        scaled = torch.cat([(x * s).clamp(0, 1) for s in self.scales])
        same = forward_in_chunks(model, scaled, self.batch_size).argmax(1).view(len(self.scales), len(x)) == predicted
        return same.float().mean(0)

    @torch.no_grad()
    def _fit(self, model, x, y):
        if self.standardize == "none":
            return
        spc, pred = [], []
        chunk, device = max(1, self.batch_size // self.forward_passes()), model_device(model)
        for i in range(0, len(x), chunk):
            xb = x[i:i + chunk].to(device)
            p = model(xb).argmax(1)
            spc.append(self.spc(model, xb, p).cpu())
            pred.append(p.cpu())
        spc, pred = torch.cat(spc).double(), torch.cat(pred)
        k = model(x[:1].to(device)).shape[1]
        overall = (spc.mean(), spc.std(unbiased=False) if len(spc) > 1 else torch.tensor(0.0))
        self.mean = torch.full((k,), float(overall[0]), dtype=torch.float64)
        self.std = torch.full((k,), float(overall[1]), dtype=torch.float64)
        if self.standardize == "class":
            for c in range(k):
                own = spc[pred == c]
                if len(own) >= 2:
                    self.mean[c], self.std[c] = own.mean(), own.std(unbiased=False)
        self.std = self.std.clamp_min(MIN_STD)

    def _score(self, model, x, logits, g):
        predicted = logits.argmax(1)
        spc = self.spc(model, x, predicted)
        if self.standardize == "none":
            return spc
        mean, std = self.mean.to(x.device), self.std.to(x.device)
        return ((spc.double() - mean[predicted]) / std[predicted]).float()
