"""A patch trigger drawn at random from a family: size, shape, colours and place all come from ``trigger_seed``.

    RandomPatch(image_shape, num_classes, trigger_seed=7)             # everything drawn
    RandomPatch(image_shape, num_classes, trigger_seed=7, size=4, shape="cross", position="random")

It exists to make populations of backdoored models whose triggers nobody chose (the scan's calibration
population), so a detector is measured on patches unlike BadNets' white corner square. Options left as None are
drawn from the seed; options given are kept. The drawn pattern and mask are saved in the run's
attack.safetensors like any :class:`PatchAttack`'s, so a run reloads without the seed being re-drawn.

- ``size``: the patch's longer side in pixels (drawn from 3 to max(4, side // 5): 3 to 6 on 32x32 images);
- ``shape``: ``square`` (full rectangle of size x size), ``rect`` (size x a shorter side), ``cross`` (a plus
  sign), ``checker`` (a two-colour checkerboard), ``blob`` (a random connected mask of about 60% of the box);
- ``colours``: ``solid`` (one colour), ``two`` (two colours in a random layout), ``noise`` (every pixel its own
  colour); colours are drawn from [0, 1]^C with at least one channel near an extreme, so the patch is visible;
- ``position``: ``fixed`` (one place for every image, drawn anywhere on the image) or ``random`` (a new place
  per image, seeded).
"""

import torch

from ..errors import MapPruneError
from .patch import PatchAttack

SHAPES = ("square", "rect", "cross", "checker", "blob")
COLOURS = ("solid", "two", "noise")
POSITIONS = ("fixed", "random")


def _choice(options, g: torch.Generator):
    return options[int(torch.randint(len(options), (1,), generator=g))]


def _colour(channels: int, g: torch.Generator) -> torch.Tensor:
    c = torch.rand(channels, generator=g)
    c[int(torch.randint(channels, (1,), generator=g))] = float(torch.randint(2, (1,), generator=g))  # one extreme
    return c


def _mask(shape: str, size: int, g: torch.Generator) -> torch.Tensor:
    """A (1, h, w) mask in {0, 1} for the shape."""
    if shape == "rect":
        short = max(1, size // 2)
        return torch.ones(1, short, size) if torch.rand(1, generator=g) < 0.5 else torch.ones(1, size, short)
    m = torch.zeros(1, size, size)
    if shape == "square" or shape == "checker":
        m[:] = 1
    elif shape == "cross":
        mid = size // 2
        m[:, mid, :] = 1
        m[:, :, mid] = 1
    elif shape == "blob":  # a random walk over the box: connected, about 60% of its pixels
        r, c = size // 2, size // 2
        m[0, r, c] = 1
        while m.sum() < max(2, round(0.6 * size * size)):
            dr, dc = _choice([(0, 1), (0, -1), (1, 0), (-1, 0)], g)
            r, c = min(max(r + dr, 0), size - 1), min(max(c + dc, 0), size - 1)
            m[0, r, c] = 1
    return m


def draw_patch(image_shape, seed: int, *, size=None, shape=None, colours=None, position=None) -> dict:
    """The drawn trigger: {"size", "shape", "colours", "position", "pattern", "mask", "corner"}."""
    c, h, w = image_shape
    g = torch.Generator().manual_seed(seed)
    largest = max(4, min(h, w) // 5)
    # Every choice is drawn, given or not, so a run that records the drawn values reloads the same trigger.
    drawn = (int(torch.randint(3, largest + 1, (1,), generator=g)), _choice(SHAPES, g), _choice(COLOURS, g),
             "random" if torch.rand(1, generator=g) < 0.2 else "fixed")
    size, shape, colours, position = (given if given is not None else d
                                      for given, d in zip((size, shape, colours, position), drawn))
    mask = _mask(shape, size, g)
    ph, pw = mask.shape[1:]
    if colours == "noise":
        pattern = torch.rand(c, ph, pw, generator=g)
    else:
        first = _colour(c, g)
        second = 1 - first if colours == "two" or shape == "checker" else first
        if shape == "checker":
            layout = (torch.arange(ph)[:, None] + torch.arange(pw)[None, :]) % 2 == 0
        elif colours == "two":
            layout = torch.rand(ph, pw, generator=g) < 0.5
        else:
            layout = torch.ones(ph, pw, dtype=torch.bool)
        pattern = torch.where(layout, first[:, None, None], second[:, None, None])
    corner = None
    if position == "fixed":
        corner = [int(torch.randint(0, h - ph + 1, (1,), generator=g)), int(torch.randint(0, w - pw + 1, (1,), generator=g))]
    return {"size": size, "shape": shape, "colours": colours, "position": position, "pattern": pattern,
            "mask": mask, "corner": corner}


class RandomPatch(PatchAttack):
    name = "random-patch"

    def __init__(self, image_shape, num_classes, *, trigger_seed: int = 0, size: int | None = None,
                 shape: str | None = None, colours: str | None = None, placement: str | None = None, **kw):
        c, h, w = image_shape
        if isinstance(trigger_seed, bool) or not isinstance(trigger_seed, int) or trigger_seed < 0:
            raise MapPruneError(f"trigger_seed must be a non-negative integer, got {trigger_seed!r}")
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or not 2 <= size <= min(h, w)):
            raise MapPruneError(f"size must be a whole number of pixels from 2 to {min(h, w)}, got {size!r}")
        for what, value, valid in (("shape", shape, SHAPES), ("colours", colours, COLOURS),
                                   ("placement", placement, POSITIONS)):
            if value is not None and value not in valid:
                raise MapPruneError(f"{what} must be one of {', '.join(valid)}, got {value!r}")
        drawn = draw_patch(image_shape, trigger_seed, size=size, shape=shape, colours=colours, position=placement)
        for k in ("pattern", "mask", "position", "pattern_file", "mask_file", "position_seed"):
            if k in kw:
                raise MapPruneError(f"random-patch draws its own {k}; use the patch attack to give one")
        super().__init__(image_shape, num_classes, pattern=drawn["pattern"], mask=drawn["mask"],
                         position="random" if drawn["position"] == "random" else drawn["corner"],
                         position_seed=trigger_seed, **kw)
        self.trigger_seed = trigger_seed
        self.drawn = {k: drawn[k] for k in ("size", "shape", "colours")}
        self.placement = drawn["position"]

    def params(self):
        return {"trigger_seed": self.trigger_seed, **self.drawn, "placement": self.placement}
