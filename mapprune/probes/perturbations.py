"""The changes a probe makes to images, and the candidate triggers they leave.

A probe starts from x0 = clip(x + alpha * s, 0, 1) (:func:`random_start`) and changes it in one of these ways:
a signed step of every pixel, one small universal patch (:class:`Patches`, found by :func:`find_patches`), one
smooth universal warp (:class:`Warps`, :func:`flow_warp`) or one smooth universal additive field
(:class:`Shifts`, :func:`smooth_shift`). The patches and fields a probe finds are FMT's candidate triggers: each
can be stamped on any image (``stamp(images, which)``); :class:`CandidateSet` stamps several families as one.
:func:`null_images` is the random change of the same size that a probe's pull is measured against.
"""

from dataclasses import dataclass

import torch

WARP_GRID = 4  # control points per side of a ``warp`` probe's flow field (WaNet's k)
SMOOTH_GRID = 8  # control points per side of a ``smooth`` probe's additive field (periods of >= 8 px on 32x32)


def _random_sign(x: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, x.shape, generator=g).mul_(2).sub_(1).to(x.device, x.dtype)


FIELD_NULLS = ("sign", "field")


def null_images(objective: str, x0: torch.Tensor, eps: float, seed: int, field_null: str = "sign") -> torch.Tensor:
    """The images a probe's pull is measured against: ``x0`` changed at random by as much as the probe may change
    it. A +-eps step of every pixel, or, for a field probe with ``field_null="field"``, a random field of the
    probe's kind (random +-1 control points, as the probe's own signed step has) and size on each image."""
    if field_null == "field" and objective in FIELDS:
        cls, grid, channels = FIELDS[objective]
        side = grid(min(x0.shape[-2:]))
        g = torch.Generator().manual_seed(seed)
        phi = torch.randint(0, 2, (len(x0), channels(x0.shape[1]), side, side), generator=g).mul_(2).sub_(1)
        return cls.apply(x0, phi.to(x0.device, x0.dtype), eps)
    return (x0 + eps * _random_sign(x0, seed)).clamp(0, 1)


def random_start(x: torch.Tensor, alpha: float, seed: int) -> torch.Tensor:
    """FMT's starting point x0 = clip(x + alpha * s, 0, 1), with one seeded random sign s per pixel."""
    return (x + alpha * _random_sign(x, seed)).clamp_(0, 1)



@dataclass
class Patches:
    """k universal patches: ``pos`` (k, 2) top-left corners, ``window`` (k, C, s, s) pixel values in [0, 1]."""

    pos: torch.Tensor
    window: torch.Tensor

    def __len__(self) -> int:
        return len(self.pos)

    def select(self, idx) -> "Patches":
        return Patches(self.pos[idx], self.window[idx])

    @staticmethod
    def cat(parts: list["Patches"]) -> "Patches":
        return Patches(torch.cat([p.pos for p in parts]), torch.cat([p.window for p in parts]))

    def stamp(self, x: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
        """x (n, C, H, W) with patch ``which[i]`` pasted onto image i (a copy; x is not changed)."""
        s = self.window.shape[-1]
        h, w = x.shape[-2:]
        pos = self.pos.to(x.device)[which]
        win = self.window.to(x.device, x.dtype)[which]
        rows = torch.arange(h, device=x.device)
        cols = torch.arange(w, device=x.device)
        top, left = pos[:, 0], pos[:, 1]
        in_rows = (rows[None] >= top[:, None]) & (rows[None] < top[:, None] + s)  # (n, H)
        in_cols = (cols[None] >= left[:, None]) & (cols[None] < left[:, None] + s)  # (n, W)
        mask = (in_rows[:, :, None] & in_cols[:, None, :])[:, None]  # (n, 1, H, W)
        # Scatter the window into a full-size canvas at each image's position.
        canvas = torch.zeros_like(x)
        r = (top[:, None] + torch.arange(s, device=x.device)[None]).clamp_(max=h - 1)  # (n, s)
        c = (left[:, None] + torch.arange(s, device=x.device)[None]).clamp_(max=w - 1)
        n_idx = torch.arange(len(x), device=x.device)[:, None, None, None]
        ch_idx = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
        canvas[n_idx, ch_idx, r[:, None, :, None], c[:, None, None, :]] = win
        return torch.where(mask, canvas, x)


def _identity_grid(h: int, w: int, device) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, h, device=device), torch.linspace(-1, 1, w, device=device),
                            indexing="ij")
    return torch.stack([xs, ys], -1)  # (H, W, 2), x first as grid_sample wants


def flow_warp(x: torch.Tensor, phi: torch.Tensor, pixels: float) -> torch.Tensor:
    """x (n, C, H, W) resampled along a smooth flow: ``phi`` (n or 1, 2, k, k) control points, bicubically
    upsampled, times ``pixels`` (the displacement, in pixels, where a control point is 1); bilinear sampling at
    pixel centres, border padding. With phi = 0 it returns x exactly. (WaNet's :func:`~mapprune.attacks.wanet.warp`
    differs: it samples at a sampling grid it is given, in grid_sample's coordinates, and pads with zeros.)"""
    h, w = x.shape[-2:]
    flow = torch.nn.functional.interpolate(phi, size=(h, w), mode="bicubic", align_corners=True)
    scale = torch.tensor([2 / max(1, w - 1), 2 / max(1, h - 1)], device=x.device, dtype=x.dtype)
    grid = (_identity_grid(h, w, x.device).to(x.dtype) + pixels * flow.permute(0, 2, 3, 1) * scale).clamp(-1, 1)
    grid = grid.expand(len(x), h, w, 2)
    return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)


def smooth_shift(x: torch.Tensor, phi: torch.Tensor, eps: float) -> torch.Tensor:
    """x (n, C, H, W) plus a smooth additive field: ``phi`` (n or 1, C, k, k) control points, bicubically
    upsampled and clipped to [-1, 1], times ``eps`` (its L-inf size); the result clamped to [0, 1]. A low-pass
    change of every pixel at once, the kind of trigger (Low Frequency, SIG, a faint blend) that neither a small
    patch nor a warp can express."""
    field = torch.nn.functional.interpolate(phi, size=x.shape[-2:], mode="bicubic", align_corners=True)
    return (x + eps * field.clamp(-1, 1)).clamp(0, 1)


@dataclass
class Field:
    """k universal smooth fields: ``phi`` (k, P, g, g) control points, ``pixels`` their size (a warp's
    displacement in pixels, a shift's L-inf amplitude). Subclasses say how a field changes an image."""

    phi: torch.Tensor
    pixels: float

    def __len__(self) -> int:
        return len(self.phi)

    def select(self, idx) -> "Field":
        return type(self)(self.phi[idx], self.pixels)

    @classmethod
    def cat(cls, parts: list["Field"]) -> "Field":
        return cls(torch.cat([p.phi for p in parts]), parts[0].pixels)

    @staticmethod
    def apply(x: torch.Tensor, phi: torch.Tensor, size: float) -> torch.Tensor:
        raise NotImplementedError

    def stamp(self, x: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
        """x (n, C, H, W) with field ``which[i]`` applied to image i."""
        return self.apply(x, self.phi.to(x.device, x.dtype)[which], self.pixels)


class Warps(Field):
    """k universal warps (:func:`flow_warp`): ``phi`` (k, 2, g, g) flow control points, ``pixels`` the displacement."""

    apply = staticmethod(flow_warp)


class Shifts(Field):
    """k universal smooth additive changes (:func:`smooth_shift`): ``phi`` (k, C, g, g), ``pixels`` the L-inf
    amplitude."""

    apply = staticmethod(smooth_shift)


# The objectives whose leaf is a field's control points: (field class, control points per side for an image side,
# channels). A smooth field keeps SMOOTH_GRID points per 32 pixels (at least 2), so it stays low-pass on small images.
FIELDS = {"warp": (Warps, lambda side: WARP_GRID, lambda c: 2),
          "smooth": (Shifts, lambda side: max(2, round(SMOOTH_GRID * side / 32)), lambda c: c)}


def field_leaf(objective: str, x: torch.Tensor) -> torch.Tensor:
    """The zero control points (1, P, g, g) of a field objective's universal change, requiring grad."""
    _, grid, channels = FIELDS[objective]
    g = grid(min(x.shape[-2:]))
    return torch.zeros(1, channels(x.shape[1]), g, g, device=x.device, dtype=x.dtype, requires_grad=True)


def find_patches(grad: torch.Tensor, size: int) -> Patches:
    """One universal patch per map from (k, n, C, H, W) gradients: the gradient summed over the n images (one
    pattern for all, as a trigger is); the size x size window where it is largest, with pixels at 1 where the
    summed gradient is positive and 0 where it is not (an unbounded change on a small support, which a dense
    L-inf step cannot make)."""
    g = grad.sum(1)
    heat = torch.nn.functional.avg_pool2d(g.abs().sum(1, keepdim=True), size, stride=1)
    ww = heat.shape[-1]
    flat = heat.flatten(1).argmax(1)
    pos = torch.stack([flat // ww, flat % ww], 1)
    r = pos[:, 0, None] + torch.arange(size, device=grad.device)[None]  # (k, s)
    c = pos[:, 1, None] + torch.arange(size, device=grad.device)[None]
    k_idx = torch.arange(len(g), device=grad.device)[:, None, None, None]
    ch_idx = torch.arange(g.shape[1], device=grad.device)[None, :, None, None]
    window = (g[k_idx, ch_idx, r[:, None, :, None], c[:, None, None, :]] > 0).to(grad.dtype)
    return Patches(pos, window)


def patch_step(x0: torch.Tensor, grad: torch.Tensor, size: int, patches_out: list | None = None) -> torch.Tensor:
    """One universal patch per map (:func:`find_patches`): (k, n, C, H, W) gradients of k maps -> (k, n, C, H, W)
    images, x0 with map j's patch pasted on. ``patches_out`` collects the patches found."""
    k, n = grad.shape[:2]
    patches = find_patches(grad, size)
    if patches_out is not None:
        patches_out.append(Patches(patches.pos.cpu(), patches.window.cpu()))
    which = torch.arange(k, device=x0.device).repeat_interleave(n)
    return patches.stamp(x0.repeat(k, 1, 1, 1), which).view(k, n, *x0.shape[1:])


def default_patch(image_shape) -> int:
    """The patch side of the ``patch`` objective: 5 pixels on 32x32 images, scaled with the image."""
    return max(1, round(5 * min(image_shape[-2:]) / 32))


def cat_candidates(parts: list) -> "Patches | Field":
    """One family's candidates found chunk by chunk (a list of :class:`Patches` or of one :class:`Field` kind),
    joined in order."""
    return type(parts[0]).cat(parts)


class CandidateSet:
    """Several families of candidate triggers (patches, warps, smooth fields) as one: candidate i of the set is
    stamped by the family it falls in, the families in order."""

    def __init__(self, parts: list):
        self.parts = parts
        self.sizes = [len(p) for p in parts]

    def __len__(self) -> int:
        return sum(self.sizes)

    def stamp(self, x: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
        out, start = x.clone(), 0
        for part, size in zip(self.parts, self.sizes):
            sel = torch.nonzero((which >= start) & (which < start + size)).flatten()
            if len(sel):
                out[sel] = part.stamp(x[sel], which[sel] - start)
            start += size
        return out
