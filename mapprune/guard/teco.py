"""TeCo (Liu, Li, Wang, Hu, Ye, Jin, Wu, Xiao, "Detecting Backdoors During the Inference Stage Based on Corruption
Robustness Consistency", CVPR 2023).

A clean image loses its prediction at about the same severity whatever the corruption; a triggered image is
robust to some corruptions (the trigger survives them) and fragile to others, so the severities at which its
prediction breaks spread. With ŷ the prediction on x, for each of the fifteen ``corruptions``
(:mod:`mapprune.guard.corruptions`) t_c is the smallest severity s (1..5) whose corrupted image is predicted
other than ŷ, or 6 when none is; the score is the standard deviation of the t_c over the corruptions (population
deviation; higher is more suspicious). Only hard labels are used, and no clean data: :meth:`fit` learns nothing,
the clean images serve the threshold only.

Cost: 1 + 15 x 5 = 76 forward passes per input, plus the corruptions themselves (JPEG on the CPU).

Where ours differs, and why:
- Each (corruption, severity) is applied to the original image, as the paper describes. The reference code
  corrupts its image list in place, so each severity and each corruption is applied on top of the previous
  output; ``cumulative=True`` reproduces that.
- The corruptions are torch reimplementations with sizes that scale with the image side (see
  :mod:`mapprune.guard.corruptions`), not the ``imagecorruptions`` package, whose released version fails with
  current scikit-image and whose ImageNet-sized ladders overwhelm 8- and 32-pixel images. Noise is seeded.
- The threshold is :func:`~mapprune.guard.base.calibrate_threshold`'s rank at the stated false-positive rate on
  held-out clean images; the paper reports AUROC only, and BackdoorBench's F1-optimal threshold reads the labels.
  The score has few distinct values, so ties make the rate reached lower than asked (measured and reported).
"""

import torch

from ..errors import MapPruneError
from .base import InputDetector, forward_in_chunks
from .corruptions import CORRUPTIONS, SEVERITIES, corrupt


class TeCo(InputDetector):
    """TeCo's spread of breaking severities over corruptions (see the module's docstring)."""

    name = "teco"
    paper = "Liu et al., CVPR 2023"

    def __init__(self, *, corruptions: tuple = tuple(CORRUPTIONS), cumulative: bool = False, batch_size: int = 512,
                 seed: int = 0):
        super().__init__(batch_size=batch_size, seed=seed)
        corruptions = (corruptions,) if isinstance(corruptions, str) else tuple(corruptions)
        unknown = [c for c in corruptions if c not in CORRUPTIONS]
        if unknown or len(corruptions) < 2:
            raise MapPruneError(f"TeCo takes two or more corruptions of: {', '.join(CORRUPTIONS)}; got "
                                f"{list(corruptions)}")
        self.corruptions, self.cumulative = corruptions, cumulative

    def forward_passes(self) -> int:
        return 1 + SEVERITIES * len(self.corruptions)

    def input_chunk(self) -> int:
        # the corruptions cost per call as much as per image on small images: larger chunks than the passes
        # alone allow, the model still fed batch_size images at a time
        return max(1, 8 * self.batch_size // self.forward_passes())

    def _score(self, model, x, logits, g):
        predicted = logits.argmax(1)
        corrupted, current = [], x
        for name in self.corruptions:
            for s in range(1, SEVERITIES + 1):
                out = corrupt(current if self.cumulative else x, name, s, g)
                if self.cumulative:
                    current = out
                corrupted.append(out)
        pred = forward_in_chunks(model, torch.cat(corrupted), self.batch_size).argmax(1)
        changed = pred.view(len(self.corruptions), SEVERITIES, len(x)) != predicted
        # the first severity that changes the prediction; SEVERITIES + 1 where none does
        never = torch.full((len(self.corruptions), 1, len(x)), True, device=x.device)
        breaks = torch.cat([changed, never], 1).float().argmax(1) + 1.0
        return breaks.std(0, unbiased=False)
