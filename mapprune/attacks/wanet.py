"""WaNet (Nguyen & Tran, ICLR 2021): an imperceptible warp of the image as the trigger.

The warping field is fixed and made from ``field_seed``: uniform (2, k, k) control values in [-1, 1], divided by
their mean absolute value, upsampled bicubically to H x W. A triggered image is sampled
(``grid_sample``, bilinear, align_corners=True) at ``clamp(grid_rescale * (identity + s * field / H), -1, 1)``
in normalised coordinates, where one pixel is 2 / (H - 1): a pixel moves by s / 2 times the field value in
pixel lengths (a quarter of a pixel on average at s=0.5, under a pixel at most), smoothly. Defaults k=4,
s=0.5, grid_rescale=1.

Noise mode (cross ratio 2): besides the poisoned images (warped, target label), ``cross_ratio`` times as many
other training images are warped with the field plus independent per-pixel random noise (uniform in
[-1, 1] / H, up to half a pixel) and keep their labels, so the model must learn the exact field, not "any warp".
Difference from the original: the original draws the poisoned and noise images afresh in every batch; here they
are drawn once (static) when the training set is poisoned, because the project trains every attack with the
one training loop on a fixed uint8 tensor dataset. The noise images' indices are kept in ``state()`` as
``noise_indices`` for the record; evaluation needs only the field.

Given grids (``WaNet.from_grids``, ``field_seed=None``): the field, and optionally the identity grid, come from
outside (BackdoorBench's saved ``noise_grid`` and ``identity_grid``, mapprune.jobs.import_backdoorbench) and are kept
in ``state()``, so the run reloads without their source. The formula above is BackdoorBench's test-time warp.
"""

import torch
import torch.nn.functional as F

from ..errors import MapPruneError
from .base import Attack


def make_field(image_shape, k: int, seed: int) -> torch.Tensor:
    """The (H, W, 2) warping field (x, y displacement order of ``grid_sample``), in units of 1/H."""
    _, h, w = image_shape
    g = torch.Generator().manual_seed(seed)
    ctrl = torch.rand(1, 2, k, k, generator=g) * 2 - 1
    ctrl = ctrl / ctrl.abs().mean()
    return F.interpolate(ctrl, size=(h, w), mode="bicubic", align_corners=True)[0].permute(1, 2, 0).contiguous()


def identity_grid(h: int, w: int) -> torch.Tensor:
    """(H, W, 2) sampling positions of every pixel centre in grid_sample's [-1, 1] coordinates (x first)."""
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    return torch.stack((xs, ys), dim=-1)


def warp(x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Samples images (N, C, H, W) at ``grid`` ((H, W, 2) shared or (N, H, W, 2) per image)."""
    if grid.dim() == 3:
        grid = grid.expand(len(x), *grid.shape)
    return F.grid_sample(x, grid.to(x.device, x.dtype), mode="bilinear", padding_mode="zeros", align_corners=True)


class WaNet(Attack):
    name = "wanet"
    state_names = ("field", "noise_indices", "identity")

    def __init__(self, image_shape, num_classes, *, k: int = 4, s: float = 0.5, grid_rescale: float = 1.0,
                 cross_ratio: float = 2.0, field_seed: int | None = 20210101, **kw):
        super().__init__(image_shape, num_classes, **kw)
        if k < 2 or cross_ratio < 0:
            raise MapPruneError(f"wanet needs k >= 2 and cross_ratio >= 0, got k={k}, cross_ratio={cross_ratio}")
        self.k, self.s, self.grid_rescale, self.cross_ratio, self.field_seed = k, s, grid_rescale, cross_ratio, field_seed
        # field_seed None: the field is given (from_grids, or the run's saved state when it reloads)
        self.field = None if field_seed is None else make_field(self.image_shape, k, field_seed)
        self.identity = None  # a given identity grid (H, W, 2); None: identity_grid(H, W)
        self.noise_indices = torch.zeros(0, dtype=torch.long)

    @classmethod
    def from_grids(cls, image_shape, num_classes, field: torch.Tensor, identity: torch.Tensor | None = None, **kw):
        """A WaNet warping with the given field (H, W, 2; displacements in 1/H units, as make_field's) and, if
        given, identity grid (H, W, 2) instead of identity_grid(H, W): BackdoorBench's noise_grid and
        identity_grid without their leading 1. ``kw``: the other settings (s, grid_rescale, target, ...)."""
        atk = cls(image_shape, num_classes, field_seed=None, **kw)
        atk.load_state({"field": field} if identity is None else {"field": field, "identity": identity})
        return atk

    def load_state(self, tensors):
        super().load_state(tensors)
        want = (*self.image_shape[1:], 2)
        for name in ("field", "identity"):
            value = getattr(self, name)
            if value is None:
                continue
            if tuple(value.shape) != want or not value.is_floating_point() or not torch.isfinite(value).all():
                raise MapPruneError(f"the wanet {name} must be finite floats of shape {want} for "
                                    f"{tuple(self.image_shape)} images, got {value.dtype} {tuple(value.shape)}")
            setattr(self, name, value.float().contiguous())

    def state(self):
        state = {"field": self.field, "noise_indices": self.noise_indices}
        if self.identity is not None:
            state["identity"] = self.identity
        return state

    def grid(self, noise: torch.Tensor | None = None) -> torch.Tensor:
        """The trigger's sampling grid, with optional extra displacement ``noise`` (N, H, W, 2) in 1/H units."""
        if self.field is None:
            raise MapPruneError("this wanet has no warping field: field_seed is None and no field was given "
                                "(WaNet.from_grids, or a run's saved state)")
        h = self.image_shape[1]
        identity = self.identity if self.identity is not None else identity_grid(*self.image_shape[1:])
        grid = (self.grid_rescale * (identity + self.s * self.field / h)).clamp(-1, 1)
        return grid if noise is None else (grid + noise / h).clamp(-1, 1)

    def trigger(self, x):
        return warp(x, self.grid())

    def poison_train(self, x, y, seed):
        x, y, idx = super().poison_train(x, y, seed)
        # The noise images come from the rest of the set, drawn with a seed of their own so that the poisoned
        # images stay exactly those of base.poison_indices.
        rest = torch.ones(len(y), dtype=torch.bool)
        rest[idx] = False
        candidates = torch.nonzero(rest).flatten()
        count = min(round(self.cross_ratio * len(idx)), len(candidates))
        g = torch.Generator().manual_seed(seed + 1_000_003)
        noise_idx = candidates[torch.randperm(len(candidates), generator=g)[:count]].sort().values
        if count:
            noise = torch.rand(count, *self.image_shape[1:], 2, generator=g) * 2 - 1
            xf = x[noise_idx].float().div_(255)
            x[noise_idx] = warp(xf, self.grid(noise)).clamp_(0, 1).mul_(255).round_().to(torch.uint8)
        self.noise_indices = noise_idx
        return x, y, idx
