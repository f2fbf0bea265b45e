"""Bypass, the adversarial backdoor embedding (Tan and Shokri, "Bypassing Backdoor Detection Algorithms in Deep
Learning", IEEE EuroS&P 2020, arXiv 1905.13409).

    Bypass(image_shape, 10, base="badnets", weight=20.0)

A **training-control** attack: the attacker runs the victim's training, not only its data. The trigger and the
poisoned training set are a plain attack's (``base``, BadNets by default: a white square in the bottom-right
corner, 3x3 on 32x32 images; ``base=blended`` for a blend); what changes is the objective. A discriminator D reads
the model's latent features z(x), the input of its classifier head (PreActResNet-18: the 512 values after global
average pooling; the small CNN: 2 x width), and outputs the probability that x is a poisoned image. The model is
trained against it:

    min over the model, max over D:   CE(f(x), y) - weight * BCE(D(z(x)), p)     p = 1 for a poisoned image, else 0

D steps to lower its binary cross-entropy; the model steps on the whole expression, so it fits the task and the
backdoor while raising D's loss. The aim is poisoned images whose latent features D cannot tell from clean ones,
which defeats what the latent-separation detectors (Spectral Signatures, Activation Clustering and the like) and
latent-based pruning rely on.

**One training step** (the loss hook of :meth:`Attack.training_loss`, called by the training loop on each batch):

1. a batch of ``sample`` images is drawn at random from the poisoned training set, with p = 1 on the poisoned
   ones (about ``poison_ratio`` of them: no reweighting, the two populations keep the training set's proportions,
   clean target-class images among the clean ones);
2. one extra forward pass of the model reads their latent features z (in the model's training mode, BatchNorm
   normalising with that batch's statistics; the running statistics are left to the loop's own batches);
3. the model's term is -BCE(D(z), p) (``objective="paper"``) with D as it stands; D's parameters enter as
   detached copies, so the model's backward pass leaves D's gradients alone;
4. D takes ``disc_steps`` optimiser steps on BCE(D(z), p), z detached (the same batch at each step);
5. the loop steps the model on the cross-entropy of its own batch plus ``weight`` times that term.

At ``weight=0`` no discriminator is made and the run is the base attack's, bit for bit with the same seed.

**Defaults** are those of the Backdoor-Safety-Tuning code (``AISafety-HKUST/Backdoor_Safety_Tuning``, the
Superficial-Safety paper's, ``utils/trainer_cls_bypass.py``): weight (its ``regularization_ratio``) 20; D an MLP
z -> 256 -> 128 -> 1 with BatchNorm and LeakyReLU(0.2) after each hidden layer and a sigmoid output (``disc_hidden``
"256,128"; here the sigmoid is folded into the loss, BCE on logits); D's optimiser SGD with lr 1e-3 and momentum
0.9 (``disc_optimizer``, ``disc_lr``, ``disc_momentum``); every batch one model step then one D step
(``disc_steps`` 1); a batch of 128 (``sample``); BadNets at poison ratio 0.1, target 0. TrojanZoo's
re-implementation (``trojanvision/attacks/backdoor/bypass_embed.py``) uses weight 10, Adam at lr 1e-3 and a
two-way softmax output (``disc_optimizer="adam"`` gives its optimiser). The paper tunes the weight per dataset,
from about 1 to a few tens [recalled, not checked against the paper's text].

``objective="confuse"`` is a variant of ours, not the paper's: the model's term is BCE(D(z), 1/2) - ln 2 (zero when
D outputs 1/2 everywhere), bounded below, where the paper's -BCE can be lowered without end by making D confidently
wrong while the features stay separable for a probe fitted afresh. Judge either with a fresh probe
(:func:`probe_separation`), never with D itself.

Where ours differs from the paper and the released code, and why:

- **the discriminator's batch**: the released code reads z from the training batch itself and knows which of its
  images are poisoned. The project's one training loop hands the loss hook images and labels without their
  training-set indices, so the attack draws its own batch of ``sample`` images from the poisoned training set
  (kept by :meth:`poison_train`, with the poison flags; drawn with a generator seeded by the poisoning seed) and
  reads their z in one extra forward pass: the same populations and proportions, another random batch, at the cost
  of that forward and backward pass per step;
- **augmentation**: those images are read as stored, without the loop's random crop and flip (the detectors this
  attack evades read the training images as stored too);
- **BatchNorm**: the extra pass leaves the model's running statistics alone, so they stay those of the loop's
  batches; in the released code the one forward pass updates them;
- **order within a step**: D's step is taken before the loop's model step, against detached features and with the
  model's term already made with D as it was; the result is the released code's (model step against D, then D's
  step on the same features);
- **schedule**: the released code's, D and model alternating on every batch from the first. The paper trains
  normally first [recalled] and TrojanZoo trains 10 plain epochs and then, before each model epoch, D for 100
  epochs on a set of non-target images and their triggered copies; neither is built (the loss hook sees batches,
  not epochs);
- **D's state** lives only during training: it is not saved with the run (the trigger alone reloads it) nor in the
  training checkpoint, so a run resumed after an interruption starts a fresh D;
- **all-to-one only**, as in both implementations; ``all_to_all`` is refused.

On the 8x8 digits (small CNN, ``demo`` preset, 240 steps) the published D barely learns and the model, winning
against it, wrecks itself at weight 20 (clean accuracy 15% with BadNets, 9% with Blended) or pushes the poisoned
images further from the clean ones at weight 0.5; with Adam, 5 D steps per model step and weight 0.2 (Blended) the
mean latent shift between poisoned and clean target-class images falls 10 to 50 times at the base attack's ACC and
ASR, while a fresh linear probe still tells the two apart at a balanced accuracy of 83-90% (figures in
docs/attacks.md).
"""

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ..errors import MapPruneError
from .adaptive import RegularisedAttack

OBJECTIVES = ("paper", "confuse")
DISC_OPTIMIZERS = ("sgd", "adam")


def parse_hidden(value) -> list[int]:
    """The discriminator's hidden widths from a list of whole numbers or a string such as "256,128" (empty: a
    linear discriminator)."""
    if isinstance(value, str):
        parts = [v.strip() for v in value.strip().strip("[]()").split(",") if v.strip()]
        try:
            items = [int(v) for v in parts]
        except ValueError:
            items = None
    elif isinstance(value, list | tuple) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        items = list(value)
    else:
        items = None
    if items is None or any(v < 1 for v in items):
        raise MapPruneError(f"disc_hidden is the discriminator's hidden widths, positive whole numbers such as "
                            f"\"256,128\" or [256, 128], got {value!r}")
    return items


class Discriminator(nn.Module):
    """An MLP from latent features to one logit (poisoned vs clean): Linear, BatchNorm, LeakyReLU(0.2) per hidden
    layer, then a Linear to one output."""

    def __init__(self, dim: int, hidden: list[int]):
        super().__init__()
        layers: list[nn.Module] = []
        for h in hidden:
            layers += [nn.Linear(dim, h), nn.BatchNorm1d(h), nn.LeakyReLU(0.2)]
            dim = h
        layers.append(nn.Linear(dim, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).squeeze(1)


def classifier_head(model: nn.Module) -> nn.Linear:
    """The model's last nn.Linear, its classifier head: the latent features are its input."""
    heads = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not heads:
        raise MapPruneError("bypass reads the model's latent features at the input of its classifier head, and this "
                            "model has no nn.Linear")
    return heads[-1]


@contextmanager
def running_stats_frozen(model: nn.Module):
    """BatchNorm layers normalise with each batch's own statistics (in training mode) without updating their running
    statistics."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    for m in norms:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in norms:
            m.track_running_stats = True


def latent_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(N, D) input of the model's classifier head on float images ``x``, gradients kept, in the model's current mode
    (BatchNorm running statistics untouched)."""
    box: list[torch.Tensor] = []
    handle = classifier_head(model).register_forward_pre_hook(lambda mod, inputs: box.append(inputs[0]))
    try:
        with running_stats_frozen(model):
            model(x)
    finally:
        handle.remove()
    return box[0].flatten(1)


class Bypass(RegularisedAttack):
    name = "bypass"

    def __init__(self, image_shape, num_classes, *, weight: float = 20.0, sample: int = 128,
                 objective: str = "paper", disc_hidden=(256, 128), disc_optimizer: str = "sgd",
                 disc_lr: float = 1e-3, disc_momentum: float = 0.9, disc_steps: int = 1, all_to_all: bool = False,
                 **kw):
        if all_to_all:
            raise MapPruneError("bypass is all-to-one, as in the paper's code; all_to_all does not apply")
        if objective not in OBJECTIVES:
            raise MapPruneError(f"objective is one of {', '.join(OBJECTIVES)} (paper: the model raises the "
                                f"discriminator's loss; confuse: pushes its output to 1/2), got {objective!r}")
        if disc_optimizer not in DISC_OPTIMIZERS:
            raise MapPruneError(f"disc_optimizer is one of {', '.join(DISC_OPTIMIZERS)}, got {disc_optimizer!r}")
        hidden = parse_hidden(disc_hidden)
        if not (isinstance(disc_lr, int | float) and not isinstance(disc_lr, bool) and math.isfinite(disc_lr)
                and disc_lr > 0):
            raise MapPruneError(f"disc_lr must be a positive number, got {disc_lr!r}")
        if not (isinstance(disc_momentum, int | float) and not isinstance(disc_momentum, bool)
                and 0 <= disc_momentum < 1):
            raise MapPruneError(f"disc_momentum must be in [0, 1), got {disc_momentum!r}")
        if isinstance(disc_steps, bool) or not isinstance(disc_steps, int) or disc_steps < 1:
            raise MapPruneError(f"disc_steps is the discriminator's steps per model step, a whole number >= 1, got "
                                f"{disc_steps!r}")
        if isinstance(sample, bool) or not isinstance(sample, int):
            raise MapPruneError(f"sample is the discriminator's batch size, a whole number >= 2, got {sample!r}")
        super().__init__(image_shape, num_classes, weight=weight, sample=sample, **kw)
        self.objective, self.disc_hidden, self.disc_optimizer = objective, hidden, disc_optimizer
        self.disc_lr, self.disc_momentum, self.disc_steps = float(disc_lr), float(disc_momentum), disc_steps
        self.discriminator: Discriminator | None = None  # made by the first training step; never saved
        self._disc_opt: torch.optim.Optimizer | None = None
        self._pool: tuple[torch.Tensor, torch.Tensor] | None = None  # (poisoned training images, poison flags)
        self._draw = torch.Generator()

    def params(self):
        return {**super().params(), "objective": self.objective, "disc_hidden": self.disc_hidden,
                "disc_optimizer": self.disc_optimizer, "disc_lr": self.disc_lr, "disc_momentum": self.disc_momentum,
                "disc_steps": self.disc_steps}

    # -- the poisoned set the discriminator's batches come from --------------------------------------------------
    def poison_train(self, x, y, seed):
        xp, yp, idx = super().poison_train(x, y, seed)
        flags = torch.zeros(len(y), dtype=torch.bool)
        flags[idx] = True
        self._pool = (xp, flags)
        self._draw.manual_seed(seed)
        return xp, yp, idx

    def draw_batch(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """A random batch of ``sample`` poisoned-set images (float, on ``device``) and their flags (1.0: poisoned)."""
        images, flags = self._pool
        pick = torch.randperm(len(flags), generator=self._draw)[:self.sample]
        return images[pick].to(device).float().div_(255), flags[pick].to(device).float()

    # -- the discriminator --------------------------------------------------------------------------------------
    def make_discriminator(self, dim: int, device) -> None:
        """A fresh discriminator for ``dim`` latent features and its optimiser (seeded, the global generator left
        alone)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.discriminator = Discriminator(dim, self.disc_hidden).to(device)
        params = self.discriminator.parameters()
        if self.disc_optimizer == "adam":
            self._disc_opt = torch.optim.Adam(params, lr=self.disc_lr)
        else:
            self._disc_opt = torch.optim.SGD(params, lr=self.disc_lr, momentum=self.disc_momentum)

    def disc_loss(self, logits: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
        """D's binary cross-entropy (mean over the batch, no reweighting)."""
        return F.binary_cross_entropy_with_logits(logits, flags)

    def model_term(self, logits: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
        """What the model's loss adds, times ``weight``: -BCE (paper) or BCE against 1/2 less ln 2 (confuse)."""
        if self.objective == "paper":
            return -self.disc_loss(logits, flags)
        return F.binary_cross_entropy_with_logits(logits, torch.full_like(flags, 0.5)) - math.log(2)

    def penalty(self, model, x, y):
        xb, flags = self.draw_batch(x.device)
        z = latent_features(model, xb.contiguous(memory_format=torch.channels_last))
        with torch.autocast(z.device.type, enabled=False):
            z = z.float()
            if self.discriminator is None:
                self.make_discriminator(z.shape[1], z.device)
            d = self.discriminator
            frozen = {k: v.detach().clone() for k, v in d.named_parameters()}
            term = self.model_term(functional_call(d, frozen, (z,)), flags)
            zd = z.detach()
            for _ in range(self.disc_steps):
                self._disc_opt.zero_grad(set_to_none=True)
                self.disc_loss(d(zd), flags).backward()
                self._disc_opt.step()
        return term

    def training_loss(self, model):
        self.discriminator, self._disc_opt = None, None  # every training starts against a fresh discriminator
        if self.weight > 0:
            if self._pool is None:
                raise MapPruneError("bypass trains against its own poisoned set: call poison_train before "
                                    "training_loss")
            classifier_head(model)  # a model without a head to read is refused here, before any training
        return super().training_loss(model)


@torch.no_grad()
def stored_latents(model: nn.Module, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """(N, D) float64 latent features (the input of the classifier head) of uint8 ``images``, the model in eval
    mode (its mode is restored afterwards)."""
    was = model.training
    model.eval()
    box: list[torch.Tensor] = []
    handle = classifier_head(model).register_forward_pre_hook(lambda mod, inputs: box.append(inputs[0].flatten(1)))
    dev = next(model.parameters()).device
    try:
        for i in range(0, len(images), batch_size):
            model(images[i:i + batch_size].to(dev).float().div(255))
    finally:
        handle.remove()
        model.train(was)
    return torch.cat(box).double().cpu()


def latent_shift(model: nn.Module, clean: torch.Tensor, poisoned: torch.Tensor) -> float:
    """The shift between the mean latent features of ``poisoned`` and ``clean`` uint8 images, squared, over the mean
    of the two groups' total variances (the trace of each covariance): 0 when the means coincide. The mean shift is
    what Spectral Signatures' top singular direction and Activation Clustering's two clusters pick up."""
    fc, fp = stored_latents(model, clean), stored_latents(model, poisoned)
    within = (fc.var(0).sum() + fp.var(0).sum()) / 2
    return float((fp.mean(0) - fc.mean(0)).pow(2).sum() / within.clamp_min(1e-12))


def probe_separation(model: nn.Module, clean: torch.Tensor, poisoned: torch.Tensor, *, seed: int = 0) -> float:
    """How well a fresh linear probe tells ``poisoned`` from ``clean`` uint8 images by the model's latent features
    (eval mode): balanced accuracy of a logistic regression on standardised features, fitted on a seeded half of
    each group and scored on the other half. 0.5 is chance, 1.0 full separation."""
    # lazy: scikit-learn takes about a second to import; every command imports the attacks, few measure a probe
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.preprocessing import StandardScaler

    if min(len(clean), len(poisoned)) < 4:
        raise MapPruneError("the probe needs at least 4 clean and 4 poisoned images")
    feats = torch.cat([stored_latents(model, clean), stored_latents(model, poisoned)]).numpy()
    labels = torch.cat([torch.zeros(len(clean)), torch.ones(len(poisoned))]).long().numpy()
    g = torch.Generator().manual_seed(seed)
    fit = torch.zeros(len(labels), dtype=torch.bool)
    for start, n in ((0, len(clean)), (len(clean), len(poisoned))):
        fit[start + torch.randperm(n, generator=g)[:n // 2]] = True
    fit = fit.numpy()
    scale = StandardScaler().fit(feats[fit])
    probe = LogisticRegression(max_iter=2000).fit(scale.transform(feats[fit]), labels[fit])
    return float(balanced_accuracy_score(labels[~fit], probe.predict(scale.transform(feats[~fit]))))
