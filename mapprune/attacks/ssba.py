"""SSBA (Li et al. 2021, "Invisible Backdoor Attack with Sample-Specific Triggers").

The trigger is an invisible, image-dependent residual from a steganographic encoder that hides a fixed string
of bits in the image. BackdoorBench ships residuals made with a downloaded StegaStamp model; here the project
trains its own small StegaStamp-style encoder/decoder pair on the training images in :meth:`SSBA.prepare`
(networks and loop in ``_stega.py``):

- encoder: the secret (``bits`` of 0/1) goes through a linear layer to a 3-channel map of the image's size,
  is concatenated with the image, and five 3x3 convolutions (``width`` channels, one dilated, no batch norm)
  plus a 1x1 path from the secret map give a residual ``budget * tanh(.)``. The stego image is
  ``clamp(x + residual, 0, 1)``: no pixel moves by more than ``budget`` (0.05 = 12.75/255 by default, so
  PSNR >= 26 dB by construction; 29-31 dB measured on 16x16 test images);
- decoder: four 3x3 convolutions (two with stride 2), average pooling to at most 4x4 and a linear layer
  predicting the bits; it trains (and checks) the encoder, it is never used for poisoning;
- loss: binary cross-entropy on the decoded bits (after +-1/255 noise, so they survive uint8 rounding), plus,
  once the bits are read, ``diversity_weight`` * the cosine similarity of two images' residuals for the same
  secret (this is what makes the trigger sample-specific: without it the residuals of different images are
  96% correlated) and ``image_weight`` * a texture-weighted squared residual (changes in flat regions cost
  more). A fresh random secret per image pair, so the encoder hides any secret and the poisoning secret can
  change without retraining;
- ``steps`` Adam steps (lr ``lr`` with cosine decay, batch ``batch_size``) seeded by ``seed``. The defaults
  (32 bits, width 32: a 132k-parameter encoder, ~30k multiply-adds per pixel, and a 98k-parameter decoder;
  2000 steps of 64 images) are sized for 32x32 images on a CPU: minutes; the tests use 16 bits, width 16
  and 600 steps on 16x16 images.

Poisoning embeds ONE secret, drawn from ``secret_seed``. The trained networks are cached as a resource keyed
by the dataset fingerprint, architecture, budget, steps, seed and loss settings (not the secret);
:meth:`SSBA.state` holds the encoder's weights (``enc.*``) and the secret, so a saved run re-creates the
trigger without data or cache. On 8x8 digits the decoder does not learn to read the bits in a short run
(64 pixels are too few; a warning says so) but the bounded residual still plants a backdoor.
"""

import torch

from ..errors import MapPruneError
from ..resources import cached_resource
from . import _learned as L
from ._stega import StegaDecoder, StegaEncoder, train_stega
from .base import Attack

_VERSION = 1  # part of the cache key: bump when the networks or their training change


class SSBA(Attack):
    name = "ssba"

    def __init__(self, image_shape, num_classes, *, bits: int = 32, width: int = 32, budget: float = 0.05,
                 steps: int = 2000, batch_size: int = 64, lr: float = 1e-3, image_weight: float = 20.0,
                 diversity_weight: float = 1.0, seed: int = 0, secret_seed: int = 20240102,
                 resource: str | None = None, **kw):
        super().__init__(image_shape, num_classes, **kw)
        if bits < 1 or width < 1 or steps < 1 or batch_size < 2:
            raise MapPruneError(f"ssba needs bits, width, steps >= 1 and batch_size >= 2, got {bits}, {width}, "
                                f"{steps}, {batch_size}")
        if not 0 < budget <= 1:
            raise MapPruneError(f"ssba budget (the largest change of a pixel, in [0, 1]) must be in (0, 1], got {budget}")
        if lr <= 0 or image_weight < 0 or diversity_weight < 0:
            raise MapPruneError(f"ssba needs lr > 0 and non-negative loss weights, got {lr}, {image_weight}, "
                                f"{diversity_weight}")
        self.bits, self.width, self.budget = bits, width, budget
        self.steps, self.batch_size, self.lr = steps, batch_size, lr
        self.image_weight, self.diversity_weight = image_weight, diversity_weight
        self.seed, self.secret_seed = seed, secret_seed
        g = torch.Generator().manual_seed(secret_seed)
        self.secret = torch.randint(0, 2, (bits,), generator=g).float()
        self.encoder: StegaEncoder | None = None
        self.decoder: StegaDecoder | None = None  # only after prepare(); not part of the saved state
        self.resource = resource  # the networks' cache key hash, set by prepare()
        self.train_bit_accuracy: float | None = None  # smoothed over the last training batches

    def networks(self) -> tuple[StegaEncoder, StegaDecoder]:
        return (StegaEncoder(self.image_shape, self.bits, self.width, self.budget),
                StegaDecoder(self.image_shape, self.bits, self.width))

    def cache_key(self, dataset) -> dict:
        # any secret, same encoder; the resource hash is this key's output, not an input
        settings = {k: v for k, v in self.params().items() if k not in ("secret_seed", "resource")}
        return {"version": _VERSION, "dataset": dataset.fingerprint(), "image_shape": list(self.image_shape),
                **settings}

    def prepare(self, dataset, *, device=None, progress: bool = True) -> None:
        """Trains (or loads from the resource cache) the encoder/decoder on ``dataset.x_train``."""
        L.check_dataset(self.name, self.image_shape, dataset)
        device = torch.device(device) if device is not None else torch.device("cpu")
        tensors, self.resource = cached_resource(
            "ssba", self.cache_key(dataset), lambda: train_stega(self, dataset.x_train, device, progress))
        enc, dec = self.networks()
        L.load_prefixed(enc, tensors, "enc", "ssba encoder")
        L.load_prefixed(dec, tensors, "dec", "ssba decoder")
        self.encoder, self.decoder = L.frozen(enc), L.frozen(dec)
        self.train_bit_accuracy = float(tensors["bit_accuracy"])

    # -- the trigger ---------------------------------------------------------------------------------
    def state(self):
        if self.encoder is None:
            raise L.not_prepared(self.name)
        return {"secret": self.secret, **L.prefixed("enc", self.encoder)}

    def load_state(self, tensors):
        if "secret" not in tensors or tuple(tensors["secret"].shape) != (self.bits,):
            raise MapPruneError(f"the saved ssba state holds no secret of {self.bits} bits; the attack file is damaged")
        enc, _ = self.networks()
        L.load_prefixed(enc, tensors, "enc", "ssba encoder")
        self.secret = tensors["secret"].float()
        self.encoder = L.frozen(enc)

    @torch.no_grad()
    def trigger(self, x):
        if self.encoder is None:
            raise L.not_prepared(self.name)
        enc = self.encoder.to(x.device)
        return (x + enc(x, self.secret.to(x.device, x.dtype)[None])).clamp(0, 1)

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """The decoder's 0/1 bits for float images in [0, 1] (only after :meth:`prepare`)."""
        if self.decoder is None:
            raise L.not_prepared(self.name + " decoder")
        return (self.decoder.to(x.device)(x) > 0).float()
