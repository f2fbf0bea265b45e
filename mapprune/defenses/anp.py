"""ANP, Adversarial Neuron Pruning (Wu & Wang, NeurIPS 2021).

Learns a mask per BatchNorm channel on the clean fitting split while the neurons are adversarially perturbed
(``bn_masks.MaskedBatchNorm2d``): per batch, the noise (delta, xi) is drawn from U(-eps, eps), takes one signed
ascent step on the cross-entropy, and the masks take an SGD step on
``alpha * CE(masked) + (1 - alpha) * CE(masked and perturbed)``, clipped to [0, 1]. Channels whose mask is at
most a threshold get gamma = 0 on a fresh copy of the original model; no fine-tune.

The threshold: a fixed value if given, else (``"auto"``, the default) the largest of 0, 0.05, ..., 0.9 whose
held-out clean accuracy stays within ``max_drop`` (relative) of the unpruned model's. BackdoorBench picks it by
the lowest *test ASR*, which needs the real trigger and the test set; not here. The mask learning rate is the original code's 0.2
(BackdoorBench reuses its fine-tune lr, 0.01, for the masks); the batch is the original's 128.
"""

import copy
import math
import time

import torch
import torch.nn.functional as F

from ..errors import MapPruneError
from ..train import TrainConfig, train
from .base import CleanData, Defense, held_out_accuracy, most_aggressive
from .bn_masks import attach_masks, below, clip_masks, mask_values, zero_gamma

THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(19))  # 0, 0.05, ..., 0.9


def check_threshold(threshold, max_drop):
    number = isinstance(threshold, (int, float)) and not isinstance(threshold, bool)
    if threshold != "auto" and (not number or not 0 <= threshold <= 1):
        raise MapPruneError(f"threshold must be in [0, 1], or 'auto' to choose it on held-out data; got {threshold!r}")
    if not 0 <= max_drop < 1:
        raise MapPruneError(f"max_drop is a relative accuracy drop in [0, 1), got {max_drop}")


def prune_by_threshold(model, masks, data: CleanData, threshold, max_drop):
    """Prunes a copy of ``model`` at ``threshold``, or (``"auto"``) at the most aggressive grid threshold the
    held-out split allows. Returns (pruned model, threshold, pruned channels, the sweep as [[threshold, accuracy]
    ...], the first entry being the unpruned model's)."""
    xs, ys = data.select
    sweep = []
    if threshold == "auto":
        if len(xs) == 0:
            raise MapPruneError("threshold 'auto' chooses on held-out images: use held_out > 0, or give a threshold")
        acc0 = held_out_accuracy(model, xs, ys)

        def acc_at(t):
            return held_out_accuracy(zero_gamma(copy.deepcopy(model), below(masks, t)), xs, ys)
        threshold, tried = most_aggressive(THRESHOLDS, acc_at, acc0, max_drop)
        sweep = [[t, round(a, 6)] for t, a in [(None, acc0)] + tried]
        if threshold is None:  # even pruning the zero masks costs too much: prune nothing
            return copy.deepcopy(model), None, {}, sweep
    pruned = below(masks, threshold)
    return zero_gamma(copy.deepcopy(model), pruned), threshold, pruned, sweep


class ANP(Defense):
    """Adversarial Neuron Pruning on every affine BatchNorm2d.

    Example::

        result = ANP().repair(model, clean_images, clean_labels)
        result.extra["threshold"], result.pruned   # {BatchNorm name: [channels]}
    """

    name = "anp"
    score_label = "ANP mask value"

    def __init__(self, *, eps: float = 0.4, alpha: float = 0.2, steps: int = 1, iterations: int = 2000,
                 mask_lr: float = 0.2, batch_size: int = 128, threshold: float | str = "auto",
                 max_drop: float = 0.1, **kw):
        super().__init__(**kw)
        if eps < 0 or not 0 <= alpha <= 1:
            raise MapPruneError(f"eps must be >= 0 and alpha in [0, 1], got eps={eps}, alpha={alpha}")
        if steps < 0 or iterations < 1 or batch_size < 1 or mask_lr <= 0:
            raise MapPruneError("steps must be >= 0, iterations and batch_size >= 1, mask_lr > 0; got "
                                f"steps={steps}, iterations={iterations}, batch_size={batch_size}, mask_lr={mask_lr}")
        check_threshold(threshold, max_drop)
        self.eps, self.alpha, self.steps, self.iterations = eps, alpha, steps, iterations
        self.mask_lr, self.batch_size, self.threshold, self.max_drop = mask_lr, batch_size, threshold, max_drop

    def learn_masks(self, model, x, y, device) -> dict[str, torch.Tensor]:
        """The masks ANP learns on (x, y), by BatchNorm name."""
        work = copy.deepcopy(model)
        wrapped = attach_masks(work)
        masks = [w.mask for w in wrapped.values()]
        noise = [p for w in wrapped.values() for p in (w.delta, w.xi)]
        g = torch.Generator().manual_seed(self.seed)
        eps, alpha, steps = self.eps, self.alpha, self.steps

        def set_perturbed(on: bool):
            for w in wrapped.values():
                w.perturbed = on

        def loss_fn(out, xb, yb):
            loss = alpha * F.cross_entropy(out, yb)  # the loop's forward ran with masks only
            if eps > 0 and alpha < 1:
                with torch.no_grad():
                    for p in noise:
                        p.copy_((torch.rand(p.shape, generator=g) * 2 - 1).mul_(eps).to(p.device))
                set_perturbed(True)
                for _ in range(steps):  # signed ascent on the noise, step eps / steps, kept in [-eps, eps]
                    grads = torch.autograd.grad(F.cross_entropy(work(xb), yb), noise)
                    with torch.no_grad():
                        for p, gr in zip(noise, grads):
                            p.add_(gr.sign(), alpha=eps / max(1, steps)).clamp_(-eps, eps)
                loss = loss + (1 - alpha) * F.cross_entropy(work(xb), yb)
                set_perturbed(False)
            return loss

        epochs = math.ceil(self.iterations / math.ceil(len(x) / self.batch_size))
        cfg = TrainConfig(epochs=epochs, batch_size=self.batch_size, lr=self.mask_lr, momentum=0.9, weight_decay=0.0,
                          schedule="constant", hflip=self.hflip, seed=self.seed, amp=False)
        train(work, x, y, cfg, device=device, loss_fn=loss_fn, parameters=masks, after_step=clip_masks(wrapped),
              progress=self.progress, desc="anp masks")
        return mask_values(wrapped)

    def _repair(self, model, data: CleanData, device):
        t0 = time.perf_counter()
        masks = self.learn_masks(model, *data.fit, device)
        timings = {"masks": time.perf_counter() - t0}
        t0 = time.perf_counter()
        repaired, threshold, pruned, sweep = prune_by_threshold(model, masks, data, self.threshold, self.max_drop)
        timings["prune"] = time.perf_counter() - t0
        return self.result(repaired, timings, pruned=pruned, scores=masks,
                           extra={"threshold": threshold, "sweep": sweep})
