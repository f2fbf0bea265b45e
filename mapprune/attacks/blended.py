"""Blended (Chen et al. 2017): a fixed pattern blended into the image, x' = (1 - alpha) x + alpha p.

The pattern is the project's own, generated deterministically from ``pattern_seed``: uniform random noise
(Chen et al.'s "random pattern" key) mixed half-and-half with a smooth colour field, so it has both fine
texture and large-scale structure. No image file is shipped or downloaded. A user's own pattern: ``pattern`` (an
image file, resized to the images' size, or a (C, H, W) tensor in [0, 1]); it is saved in the run's state, so
the run reloads without the file.
"""

from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import MapPruneError
from ..images import read_image
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
    state_names = ("pattern",)

    def __init__(self, image_shape, num_classes, *, alpha: float = 0.2, pattern_seed: int = 20240101,
                 pattern=None, pattern_file: str | None = None, **kw):
        super().__init__(image_shape, num_classes, **kw)
        if not 0 < alpha <= 1:
            raise MapPruneError(f"alpha is the pattern's blend weight, in (0, 1]; got {alpha}")
        self.alpha = alpha
        self.pattern_seed = pattern_seed
        self.pattern_file = pattern_file  # where a user's pattern came from (the pattern itself is in the state)
        if pattern is None:
            self.pattern = make_pattern(self.image_shape, pattern_seed)
        elif isinstance(pattern, torch.Tensor):
            if tuple(pattern.shape) != self.image_shape or pattern.min() < 0 or pattern.max() > 1:
                raise MapPruneError(f"a blend pattern must be a {self.image_shape} tensor in [0, 1], got "
                                    f"{tuple(pattern.shape)}")
            self.pattern = pattern.float()
        else:  # an image file, resized to the images' size (as BackdoorBench does with its Hello Kitty image)
            self.pattern_file = Path(pattern).name
            self.pattern = read_image(pattern, self.image_shape[0], what="blend pattern", size=self.image_shape[1:])

    def params(self):
        out = {"alpha": self.alpha, "pattern_seed": self.pattern_seed}
        if self.pattern_file is not None:
            out["pattern_file"] = self.pattern_file
        return out

    def state(self):
        return {"pattern": self.pattern}

    def trigger(self, x):
        return (1 - self.alpha) * x + self.alpha * self.pattern.to(x.device, x.dtype)
