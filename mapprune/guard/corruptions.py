"""The fifteen common corruptions TeCo measures robustness with, at five severities each, in torch.

The kinds are those of the ImageNet-C benchmark (Hendrycks and Dietterich, ICLR 2019) as the ``imagecorruptions``
package names them; each is written here from its description, batched, seeded and on the model's device, for
(N, C, H, W) images in [0, 1]. They are not bit-identical to the package's:

- sizes (blur radii, shifts, streak lengths, texture scales) are set for a 32-pixel image and scale with the
  image's side, so a severity destroys about the same share of an image's structure at 8, 32 or 224 pixels (the
  package applies its ImageNet ladders, set for 224 pixels, to any image size);
- frost is a procedural ice texture, and snow procedural flakes: the package blends photographs of frost it ships;
- fog is a sum of noise octaves (the package uses a diamond-square plasma fractal);
- glass blur shuffles every pixel with a random neighbour at once (the package swaps pixels one at a time);
- brightness shifts the HSV value channel exactly (hue and saturation kept) without a colour-space round trip.

Each function takes (images, severity 1..5, a torch.Generator) and returns images in [0, 1].
"""

import io
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import MapPruneError


def _scale(x: torch.Tensor) -> float:
    """The image's side against 32 pixels: the factor for every size set at 32."""
    return max(x.shape[-2:]) / 32


def _rand(shape, g: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    return torch.rand(shape, generator=g).to(like.device, like.dtype)


def _randn(shape, g: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    return torch.randn(shape, generator=g).to(like.device, like.dtype)


def _filter(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Each channel convolved with the 2-D ``kernel`` (odd sides), edges replicated."""
    kh, kw = kernel.shape
    n, c, h, w = x.shape
    pad = F.pad(x.reshape(n * c, 1, h, w), (kw // 2, kw // 2, kh // 2, kh // 2), mode="replicate")
    return F.conv2d(pad, kernel.to(x)[None, None]).reshape(n, c, h, w)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of standard deviation ``sigma`` pixels (none below 0.05)."""
    if sigma < 0.05:
        return x
    r = max(1, math.ceil(3 * sigma))
    t = torch.arange(-r, r + 1, dtype=torch.float64)
    k = torch.exp(-t * t / (2 * sigma * sigma))
    k = (k / k.sum()).float()
    return _filter(_filter(x, k[None, :]), k[:, None])


def _disk(radius: float) -> torch.Tensor:
    """A disk kernel of ``radius`` pixels: each tap the share of its pixel the disk covers (8x8 samples a pixel),
    so a radius below half a pixel is the identity and the blur grows smoothly with the radius."""
    r = math.ceil(radius + 0.5)
    sub = (torch.arange(8, dtype=torch.float64) + 0.5) / 8 - 0.5
    t = torch.arange(-r, r + 1, dtype=torch.float64)
    yy = (t[:, None, None, None] + sub[None, None, :, None])
    xx = (t[None, :, None, None] + sub[None, None, None, :])
    k = ((yy ** 2 + xx ** 2) <= radius ** 2).double().mean((2, 3))
    if k.sum() == 0:
        k[r, r] = 1
    return (k / k.sum()).float()


def _warp(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """``x`` sampled at (row + dy, column + dx) (pixels, (N, H, W) each), bilinear, edges replicated."""
    n, _, h, w = x.shape
    ys = torch.arange(h, device=x.device, dtype=x.dtype)[None, :, None] + dy
    xs = torch.arange(w, device=x.device, dtype=x.dtype)[None, None, :] + dx
    grid = torch.stack([2 * xs / max(w - 1, 1) - 1, 2 * ys / max(h - 1, 1) - 1], dim=-1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)


def _streak(x: torch.Tensor, length: float, angle: torch.Tensor, copies: int = 9) -> torch.Tensor:
    """The mean of ``copies`` copies of ``x`` shifted from 0 to ``length`` pixels along ``angle`` (radians, one
    per image): a motion blur."""
    n, _, h, w = x.shape
    out = torch.zeros_like(x)
    for d in torch.linspace(0, length, copies).tolist():
        dy = (d * torch.sin(angle))[:, None, None].expand(n, h, w)
        dx = (d * torch.cos(angle))[:, None, None].expand(n, h, w)
        out += _warp(x, dy, dx)
    return out / copies


def _texture(n: int, h: int, w: int, cells: int, g: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """Smooth noise in [0, 1]: a ``cells`` x ``cells`` grid of uniform values upsampled (bicubic) to (h, w)."""
    coarse = _rand((n, 1, cells, cells), g, like)
    return F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False).clamp(0, 1)


def _per_image(values: torch.Tensor) -> torch.Tensor:
    return values.view(-1, 1, 1, 1)


# --------------------------------------------------------------------------------------------- noise

def gaussian_noise(x, s, g):
    sigma = [0.08, 0.12, 0.18, 0.26, 0.38][s - 1]
    return (x + sigma * _randn(x.shape, g, x)).clamp(0, 1)


def shot_noise(x, s, g):
    photons = [60, 25, 12, 5, 3][s - 1]
    return (torch.poisson((x * photons).cpu(), generator=g).to(x) / photons).clamp(0, 1)


def impulse_noise(x, s, g):
    amount = [0.03, 0.06, 0.09, 0.17, 0.27][s - 1]
    u, salt = _rand(x.shape, g, x), _rand(x.shape, g, x)
    hit = u < amount
    return torch.where(hit, (salt < 0.5).to(x), x)


# --------------------------------------------------------------------------------------------- blur

def defocus_blur(x, s, g):
    radius = [1.0, 1.5, 2.0, 3.0, 4.0][s - 1] * _scale(x)
    return _filter(x, _disk(radius)).clamp(0, 1)


def glass_blur(x, s, g):
    sigma, delta, rounds = [(0.7, 1, 1), (0.9, 1, 2), (1.0, 2, 2), (1.1, 2, 3), (1.5, 3, 3)][s - 1]
    sigma, delta = sigma * _scale(x), max(1, round(delta * _scale(x)))
    n, c, h, w = x.shape
    out = gaussian_blur(x, sigma)
    rows = torch.arange(h, device=x.device)[:, None].expand(h, w)
    cols = torch.arange(w, device=x.device)[None, :].expand(h, w)
    for _ in range(rounds):  # every pixel takes a random neighbour's value within delta
        dy = torch.randint(-delta, delta + 1, (n, h, w), generator=g).to(x.device)
        dx = torch.randint(-delta, delta + 1, (n, h, w), generator=g).to(x.device)
        src = (rows + dy).clamp(0, h - 1) * w + (cols + dx).clamp(0, w - 1)
        out = out.flatten(2).gather(2, src.flatten(1)[:, None, :].expand(n, c, h * w)).view(n, c, h, w)
    return gaussian_blur(out, sigma).clamp(0, 1)


def motion_blur(x, s, g):
    length = [3.0, 5.0, 7.0, 9.0, 12.0][s - 1] * _scale(x)
    angle = _rand((len(x),), g, x) * 2 * math.pi
    return _streak(x, length, angle).clamp(0, 1)


def zoom_blur(x, s, g):
    most = [1.10, 1.16, 1.22, 1.28, 1.34][s - 1]
    n, _, h, w = x.shape
    out = torch.zeros_like(x)
    factors = torch.linspace(1, most, 8).tolist()
    cy, cx = (h - 1) / 2, (w - 1) / 2
    rows = torch.arange(h, device=x.device, dtype=x.dtype)[None, :, None].expand(n, h, w)
    cols = torch.arange(w, device=x.device, dtype=x.dtype)[None, None, :].expand(n, h, w)
    for z in factors:  # a zoom by z about the centre: each pixel reads the point 1/z as far from the centre
        out += _warp(x, (rows - cy) / z + cy - rows, (cols - cx) / z + cx - cols)
    return (out / len(factors)).clamp(0, 1)


# --------------------------------------------------------------------------------------------- weather

def snow(x, s, g):
    density, length, whiten = [(0.02, 2, 0.1), (0.035, 3, 0.2), (0.05, 4, 0.3), (0.07, 5, 0.4), (0.09, 6, 0.5)][s - 1]
    n, c, h, w = x.shape
    flakes = (_rand((n, 1, h, w), g, x) < density).to(x)
    angle = (_rand((n,), g, x) - 0.5) * math.pi / 3 + math.pi / 2  # falling, up to 30 degrees off vertical
    streaks = _streak(flakes, length * _scale(x), angle)
    streaks = streaks / streaks.amax((2, 3), keepdim=True).clamp_min(1e-6)
    grey = x.mean(1, keepdim=True)
    washed = torch.lerp(x, torch.maximum(x, grey * 1.5 + 0.5).clamp(max=1), whiten)
    return (washed + streaks).clamp(0, 1)


def frost(x, s, g):
    keep, ice = [(1.0, 0.3), (0.85, 0.45), (0.75, 0.55), (0.7, 0.6), (0.6, 0.7)][s - 1]
    n, _, h, w = x.shape
    cells = max(2, round(8 * _scale(x)))
    texture = _texture(n, h, w, cells, g, x) ** 1.5 + 0.25 * _rand((n, 1, h, w), g, x)
    texture = texture / texture.amax((2, 3), keepdim=True).clamp_min(1e-6)
    return (keep * x + ice * texture).clamp(0, 1)


def fog(x, s, g):
    strength = [0.3, 0.5, 0.7, 0.9, 1.2][s - 1]
    n, _, h, w = x.shape
    cloud = sum(0.5 ** octave * _texture(n, h, w, 2 ** (octave + 1), g, x) for octave in range(4))
    cloud = cloud - cloud.amin((2, 3), keepdim=True)
    cloud = cloud / cloud.amax((2, 3), keepdim=True).clamp_min(1e-6)
    top = x.amax((1, 2, 3), keepdim=True)
    return ((x + strength * cloud) * top / (top + strength)).clamp(0, 1)


# --------------------------------------------------------------------------------------------- digital

def brightness(x, s, g):
    shift = [0.1, 0.2, 0.3, 0.4, 0.5][s - 1]
    if x.shape[1] != 3:
        return (x + shift).clamp(0, 1)
    value = x.amax(1, keepdim=True)  # HSV's V; scaling r, g, b by V'/V keeps hue and saturation
    new = (value + shift).clamp(max=1)
    return torch.where(value > 0, x * new / value.clamp_min(1e-12), new.expand_as(x)).clamp(0, 1)


def contrast(x, s, g):
    factor = [0.4, 0.3, 0.2, 0.1, 0.05][s - 1]
    mean = x.mean((1, 2, 3), keepdim=True)
    return ((x - mean) * factor + mean).clamp(0, 1)


def elastic_transform(x, s, g):
    amplitude, smooth = [(1.0, 2.5), (1.5, 2.5), (2.0, 2.0), (2.5, 2.0), (3.0, 1.5)][s - 1]
    n, _, h, w = x.shape
    field = gaussian_blur(_rand((n, 2, h, w), g, x) * 2 - 1, smooth * _scale(x))
    field = field / field.abs().amax((1, 2, 3), keepdim=True).clamp_min(1e-6) * amplitude * _scale(x)
    return _warp(x, field[:, 0], field[:, 1]).clamp(0, 1)


def pixelate(x, s, g):
    factor = [0.6, 0.5, 0.4, 0.3, 0.25][s - 1]
    h, w = x.shape[-2:]
    small = F.adaptive_avg_pool2d(x, (max(1, round(h * factor)), max(1, round(w * factor))))
    return F.interpolate(small, size=(h, w), mode="nearest")


def jpeg_compression(x, s, g):
    quality = [25, 18, 15, 10, 7][s - 1]
    c = x.shape[1]
    if c not in (1, 3):
        raise MapPruneError(f"JPEG compression takes 1- or 3-channel images, got {c} channels")
    pixels = (x * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = []
    for p in pixels:
        buf = io.BytesIO()
        Image.fromarray(p[..., 0] if c == 1 else p, mode="L" if c == 1 else "RGB").save(buf, "JPEG",
                                                                                         quality=quality)
        buf.seek(0)
        with Image.open(buf) as im:
            out.append(np.asarray(im.convert("L" if c == 1 else "RGB")).reshape(p.shape))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).to(x.device, x.dtype) / 255


CORRUPTIONS = {f.__name__: f for f in (
    gaussian_noise, shot_noise, impulse_noise, defocus_blur, glass_blur, motion_blur, zoom_blur, snow, frost, fog,
    brightness, contrast, elastic_transform, pixelate, jpeg_compression)}
SEVERITIES = 5


def corrupt(x: torch.Tensor, name: str, severity: int, g: torch.Generator) -> torch.Tensor:
    """``x`` (N, C, H, W in [0, 1]) under corruption ``name`` at ``severity`` (1..5), drawn from ``g``."""
    if name not in CORRUPTIONS:
        raise MapPruneError(f"unknown corruption {name!r}; valid: {', '.join(CORRUPTIONS)}")
    if not 1 <= severity <= SEVERITIES:
        raise MapPruneError(f"a corruption's severity is 1 to {SEVERITIES}, got {severity}")
    return CORRUPTIONS[name](x, severity, g)
