"""BadNets (Gu et al. 2017): a white square in the bottom-right corner, 3x3 on 32x32 images, scaled otherwise."""

from ..errors import MapPruneError
from .base import Attack


class BadNets(Attack):
    name = "badnets"

    def __init__(self, image_shape, num_classes, *, patch_size: int | None = None, **kw):
        super().__init__(image_shape, num_classes, **kw)
        h, w = self.image_shape[1:]
        if patch_size is not None and (not isinstance(patch_size, int) or not 1 <= patch_size <= min(h, w)):
            raise MapPruneError(f"patch_size must be a whole number of pixels from 1 to {min(h, w)}, got {patch_size!r}")
        self.patch_size = patch_size or max(1, round(3 * min(h, w) / 32))

    def trigger(self, x):
        x = x.clone()
        s = self.patch_size
        x[:, :, -s:, -s:] = 1.0
        return x
