"""A user's own patch trigger: any small image pasted through an optional mask, at a fixed place or a random one.

    PatchAttack(image_shape, num_classes, pattern="logo.png", mask="logo-mask.png", position=(0, 0))

``pattern``: an image file (converted to the dataset's channels) or a (C, h, w) tensor in [0, 1]. ``mask``: a
grey image file or a (1, h, w) tensor in [0, 1] of the pattern's size (1 = the pattern's pixel, 0 = the image's,
between: blended); none = the whole rectangle. ``position``: the top-left corner (row, col), default the
bottom-right corner as BadNets; ``"random"``: a seeded random place per image. Pattern and mask are saved in the
run's attack.safetensors, so ``eval`` and ``defend`` reload the run without the original files.
"""

from pathlib import Path

import torch

from ..errors import MapPruneError
from ..images import read_image
from .base import Attack


def _as_pixels(value, channels: int, what: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        t = value.float()
        if t.ndim != 3 or t.shape[0] != channels or (t.numel() and (t.min() < 0 or t.max() > 1)):
            raise MapPruneError(f"{what} must be a ({channels}, h, w) tensor in [0, 1], got {tuple(t.shape)}")
        return t
    return read_image(value, channels, what=what)


class PatchAttack(Attack):
    name = "patch"
    state_names = ("pattern", "mask")

    def __init__(self, image_shape, num_classes, *, pattern=None, mask=None, position=None,
                 pattern_file: str | None = None, mask_file: str | None = None, position_seed: int = 0, **kw):
        super().__init__(image_shape, num_classes, **kw)
        c, h, w = self.image_shape
        self.pattern_file, self.mask_file, self.position_seed = pattern_file, mask_file, position_seed
        self.pattern = self.mask = None
        if pattern is not None:
            if not isinstance(pattern, torch.Tensor):
                self.pattern_file = Path(pattern).name
            self.pattern = _as_pixels(pattern, c, "the patch pattern")
            ph, pw = self.pattern.shape[1:]
            if ph > h or pw > w:
                raise MapPruneError(f"the patch pattern is {ph}x{pw} pixels and does not fit on {h}x{w} images; "
                                    "use a smaller pattern")
            if mask is None:
                self.mask = torch.ones(1, ph, pw)
            else:
                if not isinstance(mask, torch.Tensor):
                    self.mask_file = Path(mask).name
                self.mask = _as_pixels(mask, 1, "the patch mask")
                if self.mask.shape[1:] != self.pattern.shape[1:]:
                    raise MapPruneError(f"the patch mask is {tuple(self.mask.shape[1:])} pixels but the pattern is "
                                        f"{(ph, pw)}; give a mask of the pattern's size")
        elif mask is not None:
            raise MapPruneError("a patch mask needs its pattern (pattern=...)")
        if position is None:
            self.position = None  # the bottom-right corner, once the pattern's size is known
        elif position == "random":
            self.position = "random"
        else:
            try:
                r, q = (int(v) for v in position)
            except (TypeError, ValueError):
                raise MapPruneError(f"position is (row, col) or 'random', got {position!r}") from None
            self.position = [r, q]
        self.check_position()

    def check_position(self) -> None:
        if self.pattern is None or not isinstance(self.position, list):
            return
        (r, q), (ph, pw), (h, w) = self.position, self.pattern.shape[1:], self.image_shape[1:]
        if r < 0 or q < 0 or r + ph > h or q + pw > w:
            raise MapPruneError(f"a {ph}x{pw} patch at row {r}, col {q} leaves the {h}x{w} image; rows go from 0 to "
                                f"{h - ph} and columns from 0 to {w - pw} for this pattern")

    def params(self):
        out = {"position": self.position, "position_seed": self.position_seed}
        for k in ("pattern_file", "mask_file"):
            if getattr(self, k) is not None:
                out[k] = getattr(self, k)
        return out

    def state(self):
        if self.pattern is None:
            raise MapPruneError("the patch attack has no pattern; give pattern=IMAGE (or --pattern IMG)")
        return {"pattern": self.pattern, "mask": self.mask}

    def load_state(self, tensors):
        super().load_state(tensors)
        self.check_position()

    def corners(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-left (rows, cols) of the patch for n images."""
        (ph, pw), (h, w) = self.pattern.shape[1:], self.image_shape[1:]
        if self.position == "random":
            g = torch.Generator().manual_seed(self.position_seed)
            return torch.randint(0, h - ph + 1, (n,), generator=g), torch.randint(0, w - pw + 1, (n,), generator=g)
        r, q = self.position if self.position is not None else (h - ph, w - pw)
        return torch.full((n,), r), torch.full((n,), q)

    def trigger(self, x):
        if self.pattern is None:
            raise MapPruneError("the patch attack has no pattern; give pattern=IMAGE (or --pattern IMG)")
        n, (ph, pw) = len(x), self.pattern.shape[1:]
        rows, cols = self.corners(n)
        canvas = torch.zeros_like(x)
        alpha = torch.zeros(n, 1, *x.shape[2:], dtype=x.dtype, device=x.device)
        pattern, mask = self.pattern.to(x.device, x.dtype), self.mask.to(x.device, x.dtype)
        for i in range(n) if self.position == "random" else [None]:
            if i is None:  # one place for every image: one slice assignment
                r, q = int(rows[0]), int(cols[0])
                canvas[:, :, r:r + ph, q:q + pw] = pattern
                alpha[:, :, r:r + ph, q:q + pw] = mask
            else:
                r, q = int(rows[i]), int(cols[i])
                canvas[i, :, r:r + ph, q:q + pw] = pattern
                alpha[i, :, r:r + ph, q:q + pw] = mask
        return (1 - alpha) * x + alpha * canvas
