"""Blended (Chen et al. 2017): a fixed pattern blended into the image, x' = (1 - alpha) x + alpha p.

The pattern is the project's own, generated deterministically from ``pattern_seed``: uniform random noise
(Chen et al.'s "random pattern" key) mixed half-and-half with a smooth colour field, so it has both fine
texture and large-scale structure. No image file is shipped or downloaded.
"""

import torch
import torch.nn.functional as F

from .base import Attack


def make_pattern(image_shape, seed: int) -> torch.Tensor:
    c, h, w = image_shape
    g = torch.Generator().manual_seed(seed)
    noise = torch.rand(1, c, h, w, generator=g)
    coarse = torch.rand(1, c, 4, 4, generator=g)
    smooth = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False).clamp(0, 1)
    return (0.5 * noise + 0.5 * smooth)[0]


class Blended(Attack):
    name = "blended"

    def __init__(self, image_shape, num_classes, *, alpha: float = 0.2, pattern_seed: int = 20240101, **kw):
        super().__init__(image_shape, num_classes, **kw)
        self.alpha = alpha
        self.pattern_seed = pattern_seed
        self.pattern = make_pattern(self.image_shape, pattern_seed)

    def params(self):
        return {"alpha": self.alpha, "pattern_seed": self.pattern_seed}

    def state(self):
        return {"pattern": self.pattern}

    def trigger(self, x):
        return (1 - self.alpha) * x + self.alpha * self.pattern.to(x.device, x.dtype)
