"""SIG (Barni et al. 2019): a horizontal sinusoid added to the image, clean-label.

x'[c, i, j] = clip(x[c, i, j] + delta / 255 * sin(2 pi j f / W)), the same on every row and channel
(delta 40; f 6 on 32-pixel-wide images, the protocol's CIFAR/GTSRB setting, and by default scaled with the
width elsewhere so the stripes keep their 5.3-pixel period, as BadNets scales its patch: f 3 at 16 pixels,
1.5 at 8). Only target-class training images are poisoned and their labels are kept: the model learns
the stripes as a feature of the target class, and at test time stripes on any image point to it.

Poison ratio: as in BackdoorBench, the ratio is of the whole training set, drawn from the target class and
capped at its size (base.Attack.poison_indices). The protocol's 10% is therefore every target image on
CIFAR-10 (5,000 of 5,000) and on the digits (125 of 125); pass a smaller ratio to poison part of the class.

It needs a varied target class to plant: on the 8x8 digits the digit's shape explains class 0 completely and
the stripes are ignored (measured ASR 0-7% with delta 40 or 80); see tests/test_attacks_clean_label_training.py.
"""

import math

import torch

from ..errors import MapPruneError
from .base import Attack


def sinusoid(width: int, delta: float, frequency: float) -> torch.Tensor:
    """The (W,) signal delta / 255 * sin(2 pi j f / W) in [0, 1] pixel units."""
    j = torch.arange(width, dtype=torch.float64)
    return (delta / 255 * torch.sin(2 * math.pi * j * frequency / width)).float()


class SIG(Attack):
    name = "sig"
    clean_label = True

    def __init__(self, image_shape, num_classes, *, delta: float = 40, frequency: float | None = None, **kw):
        super().__init__(image_shape, num_classes, **kw)
        width = self.image_shape[2]
        if frequency is None:
            frequency = 6 * width / 32
        if not 0 < frequency < width / 2:
            # At or above Nyquist the stripes alias into another frequency or vanish (f = W/2 samples only zeros).
            raise MapPruneError(f"sig frequency must be in (0, {width / 2:g}) cycles per image width on "
                                f"{width}-pixel-wide images, got {frequency:g}")
        if not 0 < delta <= 255:
            raise MapPruneError(f"sig delta must be in (0, 255] (grey levels), got {delta:g}")
        self.delta = delta
        self.frequency = frequency
        self.signal = sinusoid(width, delta, frequency)

    def trigger(self, x):
        return (x + self.signal.to(x.device, x.dtype)).clamp(0, 1)  # (W,) broadcasts over rows and channels
