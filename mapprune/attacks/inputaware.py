"""Input-aware dynamic backdoor (Nguyen & Tran, NeurIPS 2020).

Every image gets its own trigger: a pattern generator G and a mask generator M, both small encoder-decoder
conv nets on the image itself, give ``trigger(x) = x * (1 - M(x)) + G(x) * M(x)`` with a pattern in [0, 1] (the
image's channels) and a 1-channel, nearly binary mask in [0, 1]. Both are trained in :meth:`InputAware.prepare`
(networks and loop in ``_generators.py``), as in the paper, with Adam (lr ``lr`` = 0.01, betas 0.5/0.9):

1. the mask generator alone for ``mask_steps``: a diversity loss ``||x1 - x2|| / ||M(x1) - M(x2)||`` (two
   images must get different masks) plus ``lambda_norm * relu(mean(M(x)) - mask_density)`` (the mask covers
   about ``mask_density`` of the image); then it is frozen;
2. the pattern generator jointly with a classifier for ``steps``: on each batch a ``joint_attack_ratio`` part is
   triggered with its own trigger and labelled with the target (backdoor CE), a ``joint_cross_ratio`` part gets
   the trigger of ANOTHER image and keeps its true label (cross-trigger CE: a trigger only works on the image
   it was made for), the rest stays clean (clean CE), plus ``lambda_div`` times the diversity loss on G.

The paper's classifier IS the backdoored model. Here that joint classifier (``joint_model``, the small CNN by
default) is a scaffold for training the generators, with its own short loop (Adam at 1e-3, the same crop/flip
augmentation as :func:`mapprune.train.augment_batch`): generator training is not classifier training. The
backdoored model is then trained by the project's one loop on a statically poisoned set (:meth:`poison_train`):
the poison images get their own trigger and the target label, and ``cross_ratio`` times as many other images
(1x: BackdoorBench sets num_cross = num_bd, the paper p_cross = p_attack = 0.1) get another image's
trigger with their label kept. The triggers are fixed per image instead of changing with G every epoch.

Defaults are CPU-sized (the paper trains hundreds of epochs): generators of width 16 (~24k parameters each),
500 mask steps and 2000 joint steps of 64 images, a mask density of 0.032 (the paper's); the tests use 200 + 300
steps and density 0.1 on the 8x8 digits, where 3% is two pixels (measured ASR 0.75). The generators are cached
as a resource keyed by the dataset fingerprint, the target rule and every setting above; :meth:`state` holds
their weights (``gen.*``, ``mask.*``), so a saved run re-creates the trigger without data or cache.
"""

import torch

from ..errors import MapPruneError, unknown_name
from ..models import MODELS
from ..resources import cached_resource
from . import _generators
from . import _learned as L
from ._generators import MaskGenerator, PatternGenerator, compose
from .base import Attack

_VERSION = 1  # part of the cache key: bump when the networks or their training change


class InputAware(Attack):
    name = "inputaware"

    def __init__(self, image_shape, num_classes, *, width: int = 16, mask_steps: int = 500, steps: int = 2000,
                 batch_size: int = 64, lr: float = 1e-2, mask_density: float = 0.032, lambda_div: float = 1.0,
                 lambda_norm: float = 100.0, joint_attack_ratio: float = 0.1, joint_cross_ratio: float = 0.1,
                 joint_model: str = "smallcnn", joint_width: int = 32, cross_ratio: float = 1.0, seed: int = 0,
                 resource: str | None = None, **kw):
        super().__init__(image_shape, num_classes, **kw)
        if width < 1 or mask_steps < 0 or steps < 1 or batch_size < 2 or joint_width < 1:
            raise MapPruneError("inputaware needs width, steps, joint_width >= 1, mask_steps >= 0 and batch_size >= 2; "
                                f"got {width}, {steps}, {joint_width}, {mask_steps}, {batch_size}")
        if not 0 < mask_density < 1:
            raise MapPruneError(f"inputaware mask_density (the masked fraction of an image) must be in (0, 1), got "
                                f"{mask_density}")
        if (joint_attack_ratio <= 0 or joint_cross_ratio < 0 or joint_attack_ratio + joint_cross_ratio >= 1
                or not 0 <= cross_ratio <= 10):
            raise MapPruneError("inputaware needs joint_attack_ratio > 0, joint_cross_ratio >= 0 with a sum below 1 "
                                f"and cross_ratio in [0, 10]; got {joint_attack_ratio}, {joint_cross_ratio}, "
                                f"{cross_ratio}")
        if lr <= 0 or lambda_div < 0 or lambda_norm < 0:
            raise MapPruneError(f"inputaware needs lr > 0 and non-negative lambdas, got {lr}, {lambda_div}, "
                                f"{lambda_norm}")
        if joint_model not in MODELS:
            raise unknown_name("model", joint_model, MODELS)
        self.width, self.mask_steps, self.steps, self.batch_size, self.lr = width, mask_steps, steps, batch_size, lr
        self.mask_density, self.lambda_div, self.lambda_norm = mask_density, lambda_div, lambda_norm
        self.joint_attack_ratio, self.joint_cross_ratio = joint_attack_ratio, joint_cross_ratio
        self.joint_model, self.joint_width = joint_model, joint_width
        self.cross_ratio, self.seed = cross_ratio, seed
        self.generator: PatternGenerator | None = None
        self.mask: MaskGenerator | None = None
        self.resource = resource  # the networks' cache key hash, set by prepare()
        self.joint_stats: dict[str, float] = {}  # the joint classifier's last-batch accuracies (after prepare)
        self.cross_indices: torch.Tensor | None = None  # set by poison_train

    def networks(self):
        c = self.image_shape[0]
        return PatternGenerator(c, self.width), MaskGenerator(c, self.width)

    # -- training the generators ---------------------------------------------------------------------
    def cache_key(self, dataset) -> dict:
        keep = ("width", "mask_steps", "steps", "batch_size", "lr", "mask_density", "lambda_div", "lambda_norm",
                "joint_attack_ratio", "joint_cross_ratio", "joint_model", "joint_width", "seed")
        return {"version": _VERSION, "dataset": dataset.fingerprint(), "image_shape": list(self.image_shape),
                "num_classes": self.num_classes, "target": self.target, "all_to_all": self.all_to_all,
                **{k: getattr(self, k) for k in keep}}

    def prepare(self, dataset, *, device=None, progress: bool = True) -> None:
        """Trains (or loads from the resource cache) the mask and pattern generators on ``dataset``'s training set."""
        L.check_dataset(self.name, self.image_shape, dataset)
        if dataset.num_classes != self.num_classes:
            raise MapPruneError(f"inputaware was created for {self.num_classes} classes but {dataset.name!r} has "
                                f"{dataset.num_classes}")
        device = torch.device(device) if device is not None else torch.device("cpu")
        tensors, self.resource = cached_resource(
            "inputaware", self.cache_key(dataset), lambda: _generators.train_generators(self, dataset, device, progress))
        self.load_state(tensors)
        self.joint_stats = {k[6:]: float(v) for k, v in tensors.items() if k.startswith("stats.")}

    # -- the trigger ---------------------------------------------------------------------------------
    def state(self):
        if self.generator is None or self.mask is None:
            raise L.not_prepared(self.name)
        return {**L.prefixed("gen", self.generator), **L.prefixed("mask", self.mask)}

    def load_state(self, tensors):
        gen, mask = self.networks()
        L.load_prefixed(gen, tensors, "gen", "inputaware pattern generator")
        L.load_prefixed(mask, tensors, "mask", "inputaware mask generator")
        self.generator, self.mask = L.frozen(gen), L.frozen(mask)

    @torch.no_grad()
    def trigger_parts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pattern, mask) that the generators make for float images ``x`` in [0, 1]."""
        if self.generator is None or self.mask is None:
            raise L.not_prepared(self.name)
        return self.generator.to(x.device)(x), self.mask.to(x.device)(x)

    def trigger(self, x):
        return compose(x, *self.trigger_parts(x))

    def apply_cross(self, x: torch.Tensor, donors: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        """uint8 images ``x`` with the triggers made for the uint8 images ``donors`` (one donor per image)."""
        out = torch.empty_like(x)
        for i in range(0, len(x), chunk):
            xf = x[i:i + chunk].float().div_(255)
            pattern, mask = self.trigger_parts(donors[i:i + chunk].float().div_(255))
            out[i:i + chunk] = compose(xf, pattern, mask).clamp_(0, 1).mul_(255).round_().to(torch.uint8)
        return out

    def poison_train(self, x, y, seed):
        """Poison images get their own trigger and the target label; ``cross_ratio`` times as many other images
        (seeded, drawn from the unpoisoned ones) get a random other image's trigger and keep their label.

        Returns (images, labels, poison indices) like every attack; the cross images are in ``cross_indices``.
        """
        idx = self.poison_indices(y, seed)
        g = torch.Generator().manual_seed(seed + 7919)  # independent of the poison draw
        rest = torch.ones(len(y), dtype=torch.bool)
        rest[idx] = False
        rest = torch.nonzero(rest).flatten()
        n_cross = min(round(self.cross_ratio * len(idx)), len(rest))
        cross = rest[torch.randperm(len(rest), generator=g)[:n_cross]].sort().values
        # A donor is any other training image: an offset in [1, N) never maps an image onto itself.
        donors = (cross + torch.randint(1, max(2, len(y)), (n_cross,), generator=g)) % len(y)
        out, labels = x.clone(), y.clone()
        if n_cross and len(y) > 1:
            out[cross] = self.apply_cross(x[cross], x[donors])
        if len(idx):
            out[idx] = self.apply(x[idx])
            labels[idx] = self.target_labels(y[idx])
        self.cross_indices = cross
        return out, labels, idx
