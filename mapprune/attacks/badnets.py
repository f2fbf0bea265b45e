"""BadNets (Gu et al. 2017): a white square in the bottom-right corner, 3x3 on 32x32 images, scaled otherwise."""

from .base import Attack


class BadNets(Attack):
    name = "badnets"

    def __init__(self, image_shape, num_classes, *, patch_size: int | None = None, **kw):
        super().__init__(image_shape, num_classes, **kw)
        h, w = self.image_shape[1:]
        self.patch_size = patch_size or max(1, round(3 * min(h, w) / 32))

    def params(self):
        return {"patch_size": self.patch_size}

    def trigger(self, x):
        x = x.clone()
        s = self.patch_size
        x[:, :, -s:, -s:] = 1.0
        return x
