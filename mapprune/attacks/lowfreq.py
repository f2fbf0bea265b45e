"""Low Frequency (Zeng et al., ICCV 2021): an additive universal adversarial perturbation (UAP) made
against a clean model and restricted to low spatial frequencies, so it is smooth and hard to see.

How the perturbation is made here (the original ships a pre-computed trigger; this one is built locally):
- a clean model of the training set comes from the resource cache (``surrogate*`` settings);
- ``steps`` steps of normalised gradient descent on one perturbation shared by every image, over random
  batches of non-target training images, towards the target label (all-to-all: away from the true labels);
- after every step the perturbation is low-pass filtered with an ideal FFT mask that keeps spatial frequencies
  up to ``cutoff`` times Nyquist (radially; 0.25 keeps periods of 8 pixels and longer), then scaled down into
  the L-inf ball of radius ``eps``. Scaling keeps it low-pass, unlike clipping, so the final perturbation is
  exactly band-limited and within budget.
Budget: ``eps`` 0.1 (about 26/255), a peak-to-peak range of 0.2 like the original's trigger (which is scaled
into [0, 0.2]); on 32x32 images a smooth change of that size is faint. 8x8 images are a poor fit: their low band
holds 5 numbers per channel and a digits model is robust to it (the perturbation fools ~1% of images even at
0.2), so how well the trigger is learnt varies (measured with the small CNN and 10% poison: eps 0.05 ASR 0.15;
eps 0.1 ASR 0.14 to 0.95 with the target and the clean model; eps 0.2 ASR 0.73 to 1.0).
The perturbation is a cached resource keyed by everything it depends on, and saved in ``state()``; ``params()``
records the budget, the filter and the resource's key hash.
"""

import torch
import torch.nn.functional as F

from ..errors import MapPruneError
from ..resources import cached_resource
from .surrogate import SurrogateAttack


def lowpass_mask(h: int, w: int, cutoff: float, device=None) -> torch.Tensor:
    """Boolean (H, W) mask over ``torch.fft.fft2`` bins: True where the radial frequency <= cutoff * Nyquist."""
    fy = torch.fft.fftfreq(h, device=device)[:, None]  # cycles per pixel, Nyquist = 0.5
    fx = torch.fft.fftfreq(w, device=device)[None, :]
    return (fy**2 + fx**2).sqrt() <= cutoff * 0.5 + 1e-9


def lowpass(x: torch.Tensor, cutoff: float) -> torch.Tensor:
    """Ideal low-pass filter over the last two dimensions (the mask is symmetric, so the result is real)."""
    mask = lowpass_mask(x.shape[-2], x.shape[-1], cutoff, x.device)
    return torch.fft.ifft2(torch.fft.fft2(x) * mask).real


def project(p: torch.Tensor, eps: float, cutoff: float) -> torch.Tensor:
    """Low-pass, then scale (not clip) into the L-inf ball: both constraints hold exactly afterwards."""
    p = lowpass(p, cutoff)
    m = p.abs().max()
    return p * (eps / m) if m > eps else p


def universal_perturbation(model, x: torch.Tensor, y: torch.Tensor, *, target: int | None, eps: float, cutoff: float,
                           steps: int, step_size: float, batch_size: int = 128, seed: int = 0, device=None
                           ) -> torch.Tensor:
    """A (C, H, W) perturbation p: ``model(clamp(x + p))`` predicts ``target`` (None: not the true label).

    ``x`` uint8 (N, C, H, W), ``y`` labels; ``step_size`` is the L-inf length of each normalised step.
    """
    device = device or next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    p = torch.zeros(x.shape[1:], device=device)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (min(batch_size, len(x)),), generator=g)
        xb = x[idx].to(device).float().div_(255)
        yb = y[idx].to(device)
        p.requires_grad_(True)
        logits = model((xb + p).clamp(0, 1))
        if target is None:
            loss = -F.cross_entropy(logits, yb)
        else:
            loss = F.cross_entropy(logits, torch.full_like(yb, target))
        (grad,) = torch.autograd.grad(loss, p)
        with torch.no_grad():
            d = lowpass(grad, cutoff)  # only the low-frequency part of the step is kept
            p = project(p - step_size * d / d.abs().max().clamp_min(1e-12), eps, cutoff)
    return p.detach().cpu()


class LowFrequency(SurrogateAttack):
    name = "lowfreq"
    state_names = ("perturbation",)

    def __init__(self, image_shape, num_classes, *, eps: float = 0.1, cutoff: float = 0.25, steps: int = 200,
                 step_size: float | None = None, uap_seed: int = 0, filter: str = "fft", resource: str | None = None,
                 **kw):
        super().__init__(image_shape, num_classes, **kw)
        if filter != "fft":
            raise MapPruneError(f"lowfreq filter {filter!r} is not available; the only filter is 'fft' (an ideal "
                                "radial low-pass mask)")
        if not 0 < eps <= 1:
            raise MapPruneError(f"lowfreq eps must be in (0, 1] (an L-inf budget on [0, 1] pixels), got {eps}")
        if not 0 < cutoff <= 1.5:
            raise MapPruneError(f"lowfreq cutoff must be in (0, 1.5] (a fraction of the Nyquist frequency), got {cutoff}")
        if steps < 1:
            raise MapPruneError(f"lowfreq steps must be a positive integer, got {steps}")
        self.eps = eps
        self.cutoff = cutoff
        self.steps = steps
        self.step_size = step_size if step_size is not None else eps / 10
        self.uap_seed = uap_seed
        self.resource = resource  # the perturbation's cache key hash, set by prepare()
        self.perturbation: torch.Tensor | None = None

    def params(self):
        return {"eps": self.eps, "cutoff": self.cutoff, "steps": self.steps, "step_size": self.step_size,
                "uap_seed": self.uap_seed, **self.surrogate_params(), "filter": "fft",
                "resource": self.resource}

    def state(self):
        return {} if self.perturbation is None else {"perturbation": self.perturbation}

    def prepare(self, dataset, *, device=None, progress=True):
        self.check_dataset(dataset)
        if device is not None:
            self._device = torch.device(device)
        target = None if self.all_to_all else self.target
        key = {"attack": "lowfreq", "clean_model": self.surrogate_key(dataset), "target": target, "eps": self.eps,
               "cutoff": self.cutoff, "steps": self.steps, "step_size": self.step_size, "seed": self.uap_seed}

        def build():
            model = self.surrogate_model(dataset, progress)
            keep = torch.arange(len(dataset.y_train)) if target is None else torch.nonzero(dataset.y_train != target).flatten()
            p = universal_perturbation(model, dataset.x_train[keep], dataset.y_train[keep], target=target, eps=self.eps,
                                       cutoff=self.cutoff, steps=self.steps, step_size=self.step_size,
                                       seed=self.uap_seed, device=self._device)
            return {"perturbation": p}

        tensors, self.resource = cached_resource("lowfreq_uap", key, build)
        self.perturbation = tensors["perturbation"]

    def trigger(self, x):
        if self.perturbation is None:
            raise MapPruneError("lowfreq has no perturbation yet: call prepare(dataset) first (or load a run's state)")
        return (x + self.perturbation.to(x.device, x.dtype)).clamp(0, 1)
