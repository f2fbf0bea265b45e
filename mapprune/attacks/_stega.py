"""SSBA's steganography: a small StegaStamp-style encoder/decoder pair, its losses and its training loop.

Design and measured reasons are in ssba.py's docstring; the numbers quoted here were measured on 16x16 colour
test images (tests/test_attacks_ssba_inputaware.py) and the 8x8 digits.
"""

import math
import sys

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MapPruneError
from . import _learned as L

TEXTURE_FLOOR = 0.02  # local std (on [0, 1] pixels) at which a change costs half as much as in a flat region


class StegaEncoder(nn.Module):
    """(image in [0, 1], bits in {0, 1}) -> residual bounded by ``budget`` in L-inf. No batch norm, so an
    image's residual never depends on the rest of the batch."""

    def __init__(self, image_shape, bits: int, width: int, budget: float):
        super().__init__()
        c, h, w = image_shape
        self.shape = (c, h, w)
        self.budget = budget
        self.secret = nn.Linear(bits, 3 * h * w)
        self.net = nn.Sequential(
            nn.Conv2d(c + 3, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=2, dilation=2), nn.ReLU(),  # wider context at no cost
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, c, 3, padding=1),
        )
        # A direct path from the secret map to the residual: training starts from a code the decoder can learn
        # to read at once; the convolutions adapt it to each image.
        self.skip = nn.Conv2d(3, c, 1)

    def raw(self, x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
        """The residual before the bound, in units of ``budget``."""
        _, h, w = self.shape
        s = self.secret(bits * 2 - 1).view(len(bits), 3, h, w).expand(len(x), -1, -1, -1)
        return self.net(torch.cat([x - 0.5, s], 1)) + self.skip(s)

    def forward(self, x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
        return self.budget * torch.tanh(self.raw(x, bits))


class StegaDecoder(nn.Module):
    """Image -> one logit per hidden bit."""

    def __init__(self, image_shape, bits: int, width: int):
        super().__init__()
        c, h, w = image_shape
        self.net = nn.Sequential(
            nn.Conv2d(c, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
        )
        pool = max(1, min(4, math.ceil(min(h, w) / 4)))
        self.pool = nn.AdaptiveAvgPool2d(pool)
        self.head = nn.Linear(2 * width * pool * pool, bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.net(x - 0.5)).flatten(1))


def residual_similarity(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """Mean positive cosine similarity of the centred residuals of two images that carry the same secret.

    Penalising it makes the triggers sample-specific: with only the bit and image losses the encoder hides a
    secret in one image-independent pattern (measured: residuals of different images 96% correlated, a
    universal trigger in all but name; with this term at weight 1, about 35%).
    """
    a, b = z1.flatten(1), z2.flatten(1)
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return F.cosine_similarity(a, b).clamp_min(0).mean()


def image_loss(residual: torch.Tensor, x: torch.Tensor, floor: float = TEXTURE_FLOOR) -> torch.Tensor:
    """Squared residual weighted by visibility: changes cost fully in flat regions, less in textured ones
    (texture masking, a cheap stand-in for StegaStamp's perceptual loss)."""
    mean = F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)
    std = (F.avg_pool2d(x * x, 3, 1, 1, count_include_pad=False) - mean * mean).clamp_min(0).sqrt()
    return (residual.pow(2) * (floor / (std + floor))).mean()


def train_stega(atk, x_train: torch.Tensor, device, progress: bool) -> dict[str, torch.Tensor]:
    """Trains the pair for ``atk.steps`` Adam steps; returns ``enc.*``, ``dec.*`` and ``bit_accuracy``."""
    with L.seeded(atk.seed):
        enc, dec = atk.networks()
    enc.to(device).train()
    dec.to(device).train()
    opt = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=atk.lr)
    g = torch.Generator().manual_seed(atk.seed)
    bar = L.progress_bar(atk.steps, "ssba encoder", progress)
    read = 0.5  # running fraction of bits the decoder gets right; starts at chance
    for step in range(atk.steps):
        x = L.batch(x_train, atk.batch_size, g, device)
        bits = torch.randint(0, 2, (len(x), atk.bits), generator=g).float().to(device)
        half = len(x) // 2
        bits[half:2 * half] = bits[:half]  # pairs of images carrying the same secret, for the similarity term
        z = enc.raw(x, bits)
        stego = (x + atk.budget * torch.tanh(z)).clamp(0, 1)
        noise = (torch.rand(x.shape, generator=g) * 2 - 1).to(device) / 255  # survive uint8 rounding
        logits = dec(stego + noise)
        read = 0.9 * read + 0.1 * ((logits.detach() > 0) == (bits > 0.5)).float().mean().item()
        # The similarity and image terms wait until the bits are read (0 up to 70%, full from 95%): earlier they
        # shrink or scramble the residual before the decoder can see it and the pair never learns to hide
        # anything (measured on the digits: PSNR 40 dB, bits at chance, no backdoor). The image term also waits
        # for the second half and ramps up over the third quarter, as StegaStamp ramps its image losses.
        gate = min(1.0, max(0.0, (read - 0.7) / 0.25))
        ramp = gate * min(1.0, max(0.0, 4 * step / atk.steps - 2))
        loss = (F.binary_cross_entropy_with_logits(logits, bits)
                + gate * atk.diversity_weight * residual_similarity(z[:half], z[half:2 * half])
                # on the residual before tanh: once tanh saturates at +-budget (it does early on) a loss on the
                # bounded residual has no gradient left and PSNR never rises above the bound's 26 dB
                + ramp * atk.image_weight * image_loss(atk.budget * z, x))
        for group in opt.param_groups:  # cosine decay: the last steps refine instead of jumping around
            group["lr"] = atk.lr * 0.5 * (1 + math.cos(math.pi * step / atk.steps))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if not torch.isfinite(loss):
            raise MapPruneError("ssba encoder training diverged (loss is not finite); lower lr")
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if read < 0.75:
        print(f"warning: after {atk.steps} steps the ssba decoder reads only {read:.0%} of the hidden bits: the "
              "encoder has not learned to hide the secret (raise steps, or lower bits); its bounded residual may "
              "still plant a backdoor", file=sys.stderr)
    return {**L.prefixed("enc", enc), **L.prefixed("dec", dec), "bit_accuracy": torch.tensor(read)}
