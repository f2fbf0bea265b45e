"""Label-consistent backdoor (Turner et al. 2019), clean-label.

The chosen target-class training images are first made hard to classify: PGD against a clean model
(from the resource cache), L-inf eps 8/255, ``pgd_steps`` signed steps of ``pgd_step_size`` from the image
itself (no random start), maximising the loss of the true label. Then the trigger is stamped on them and the
labels are kept. Since the images no longer look like their class to a model, the model leans on the trigger
to fit them. The trigger is Turner et al.'s: a black-and-white checkerboard patch in each of the four corners,
mirrored so a horizontal flip keeps it, 3x3 on 32x32 images and scaled like BadNets on other sizes (one white
pixel per corner on 8x8).

The PGD perturbation is per image and exists only in training data, so it is made in :meth:`poison_train`
(cached as a resource keyed by the clean model, the chosen images and the PGD settings); the test-time
:meth:`trigger` is the patch alone. Poison ratio semantics are SIG's (see sig.py): a ratio of the whole
training set, drawn from the target class and capped at its size.

On the 8x8 digits it does not plant (ASR at most 1.4% measured, even with PGD at 32/255 or 64/255): the clean
model is robust at 8/255 and the digit's shape explains the class; see tests/test_attacks_clean_label_training.py
for where it does.
"""

import hashlib

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import MapPruneError
from ..resources import cached_resource
from .surrogate import SurrogateAttack


def corner_patch(image_shape, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(H, W) mask of the four corner patches and the (H, W) checkerboard values they get."""
    _, h, w = image_shape
    i = torch.arange(h)[:, None]
    j = torch.arange(w)[None, :]
    # Distance from the nearest edge, so the four patches are mirror images of each other.
    di = torch.minimum(i, h - 1 - i)
    dj = torch.minimum(j, w - 1 - j)
    mask = (di < size) & (dj < size)
    values = ((di + dj) % 2 == 0).float()  # the corner pixel itself is white
    return mask, values


@torch.enable_grad()
def pgd_away(model, x: torch.Tensor, y: torch.Tensor, *, eps: float, steps: int, step_size: float,
             batch_size: int = 256, device=None) -> torch.Tensor:
    """uint8 images within ``eps`` (L-inf, on [0, 1] pixels) of uint8 ``x`` that maximise the loss of ``y``."""
    device = device or next(model.parameters()).device
    budget = int(eps * 255 + 1e-6)  # whole grey levels, so quantising the result never leaves the ball
    out = torch.empty_like(x)
    for i in range(0, len(x), batch_size):
        x0 = x[i:i + batch_size].to(device).float().div_(255)
        yb = y[i:i + batch_size].to(device)
        adv = x0.clone()
        for _ in range(steps):
            adv.requires_grad_(True)
            (grad,) = torch.autograd.grad(F.cross_entropy(model(adv), yb), adv)
            with torch.no_grad():
                adv = adv + step_size * grad.sign()
                adv = torch.minimum(torch.maximum(adv, x0 - eps), x0 + eps).clamp(0, 1)
        q = adv.detach().mul(255).round()
        xi = x[i:i + batch_size].to(device).float()
        out[i:i + batch_size] = torch.minimum(torch.maximum(q, xi - budget), xi + budget).to(torch.uint8).cpu()
    return out


def _digest(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(np.ascontiguousarray(t.numpy()).tobytes())
    return h.hexdigest()[:16]


class LabelConsistent(SurrogateAttack):
    name = "lc"
    clean_label = True

    def __init__(self, image_shape, num_classes, *, eps: float = 8 / 255, pgd_steps: int = 10,
                 pgd_step_size: float = 2 / 255, patch_size: int | None = None, resource: str | None = None, **kw):
        super().__init__(image_shape, num_classes, **kw)
        if not 0 <= eps <= 1 or pgd_steps < 0:
            raise MapPruneError(f"lc needs eps in [0, 1] and pgd_steps >= 0, got {eps} and {pgd_steps}")
        h, w = self.image_shape[1:]
        self.eps, self.pgd_steps, self.pgd_step_size = eps, pgd_steps, pgd_step_size
        self.patch_size = patch_size or max(1, round(3 * min(h, w) / 32))
        if 2 * self.patch_size > min(h, w):
            raise MapPruneError(f"lc patch size {self.patch_size} does not fit four times in {h}x{w} images")
        self.mask, self.values = corner_patch(self.image_shape, self.patch_size)
        self.resource = resource  # cache key hash of the PGD images, set by poison_train()
        self._model = None

    def params(self):
        return {"eps": self.eps, "pgd_steps": self.pgd_steps, "pgd_step_size": self.pgd_step_size,
                "patch_size": self.patch_size, **self.surrogate_params(), "resource": self.resource}

    def prepare(self, dataset, *, device=None, progress=True):
        self.check_dataset(dataset)
        if device is not None:
            self._device = torch.device(device)
        self._surrogate_key = self.surrogate_key(dataset)
        self._model = self.surrogate_model(dataset, progress)

    def trigger(self, x):
        m = self.mask.to(x.device)
        return torch.where(m, self.values.to(x.device, x.dtype), x)

    def harden(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The PGD step alone, on uint8 images of true labels ``y``; cached."""
        if self._model is None:
            raise MapPruneError("lc needs its clean model: call prepare(dataset) before poisoning")
        key = {"attack": "lc_pgd", "clean_model": self._surrogate_key, "images": _digest(x, y), "eps": self.eps,
               "steps": self.pgd_steps, "step_size": self.pgd_step_size}

        def build():
            return {"images": pgd_away(self._model, x, y, eps=self.eps, steps=self.pgd_steps,
                                       step_size=self.pgd_step_size, device=self._device)}

        tensors, self.resource = cached_resource("lc_pgd", key, build)
        return tensors["images"]

    def prepare_poison(self, x, y, seed):
        idx = self.poison_indices(y, seed)
        if len(idx):
            self.harden(x[idx], y[idx])

    def poison_train(self, x, y, seed):
        idx = self.poison_indices(y, seed)
        x = x.clone()
        if len(idx):
            x[idx] = self.apply(self.harden(x[idx], y[idx]))
        return x, y.clone(), idx
