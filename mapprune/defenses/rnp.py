"""RNP, Reconstructive Neuron Pruning (Li et al., ICML 2023).

Both phases use ``n_images`` class-balanced images of the fitting split (500, the paper's 1% of CIFAR-10): the
unlearning stops at the end of an epoch, and on thousands of images one epoch of ascent overshoots (measured on
CIFAR-10: 4,000 images, training accuracy 0.45 after one epoch, the loss at -194 after two, and a model no mask
can recover, ACC 10%).

1. Unlearn: gradient ascent on the cross-entropy of the clean fitting split (SGD lr 0.01, momentum 0.9, weight
   decay 5e-4), stopped after the first epoch whose training accuracy is at most ``clean_threshold``.
2. Recover: on the unlearned model, learn only a mask per BatchNorm channel (lr 0.2, momentum 0.9, loss
   ``alpha`` x CE, masks clipped to [0, 1]) for ``recover_epochs``. Clean features come back; the channels the
   backdoor needs, which unlearning left intact, are not needed for that and their masks fall.
3. Prune: gamma = 0 on a fresh copy of the original model for every channel whose mask is at most ``threshold``
   (0.7, BackdoorBench's fixed value; ``"auto"`` chooses it on held-out clean accuracy, as ANP does). No
   fine-tune.

The published schedule drops the unlearning lr at epochs 10 and 20; unlearning stops long before on CIFAR, so a
constant lr is used. The original's gradient clipping is applied before ``backward`` and so does nothing: left out.
"""

import copy
import time

import torch.nn.functional as F

from ..errors import MapPruneError
from ..train import TrainConfig, train
from .anp import check_threshold, prune_by_threshold
from .base import CleanData, Defense, pick_images
from .bn_masks import attach_masks, batchnorms, clip_masks, mask_values


class RNP(Defense):
    """Reconstructive Neuron Pruning on every affine BatchNorm2d."""

    name = "rnp"
    score_label = "RNP recovered mask value"

    def __init__(self, *, unlearn_lr: float = 0.01, unlearn_epochs: int = 20, clean_threshold: float = 0.2,
                 recover_lr: float = 0.2, recover_epochs: int = 20, alpha: float = 0.2, batch_size: int = 128,
                 threshold: float | str = 0.7, max_drop: float = 0.1, n_images: int | None = 500, **kw):
        super().__init__(**kw)
        if unlearn_lr <= 0 or recover_lr <= 0 or unlearn_epochs < 1 or recover_epochs < 1 or batch_size < 1:
            raise MapPruneError("learning rates must be > 0 and epochs and batch_size >= 1; got "
                                f"unlearn_lr={unlearn_lr}, recover_lr={recover_lr}, unlearn_epochs={unlearn_epochs}, "
                                f"recover_epochs={recover_epochs}, batch_size={batch_size}")
        if not 0 <= clean_threshold <= 1 or not 0 < alpha <= 1:
            raise MapPruneError(f"clean_threshold must be in [0, 1] and alpha in (0, 1], got {clean_threshold}, "
                                f"{alpha}")
        check_threshold(threshold, max_drop)
        if n_images is not None and n_images < 1:
            raise MapPruneError(f"n_images must be >= 1 (or None for the whole fitting split), got {n_images}")
        self.n_images = n_images
        self.unlearn_lr, self.unlearn_epochs, self.clean_threshold = unlearn_lr, unlearn_epochs, clean_threshold
        self.recover_lr, self.recover_epochs, self.alpha, self.batch_size = recover_lr, recover_epochs, alpha, batch_size
        self.threshold, self.max_drop = threshold, max_drop

    def _config(self, epochs, lr, weight_decay):
        return TrainConfig(epochs=epochs, batch_size=self.batch_size, lr=lr, momentum=0.9, weight_decay=weight_decay,
                           schedule="constant", hflip=self.hflip, seed=self.seed, amp=False)

    def unlearn(self, model, x, y, device) -> tuple:
        """A copy of ``model`` after gradient ascent on (x, y), and the ascent's history."""
        work = copy.deepcopy(model)
        history = train(work, x, y, self._config(self.unlearn_epochs, self.unlearn_lr, 5e-4), device=device,
                        loss_fn=lambda out, xb, yb: -F.cross_entropy(out, yb),
                        stop=lambda record: record["train_acc"] <= self.clean_threshold,
                        progress=self.progress, desc="rnp unlearn")
        return work, history

    def recover_masks(self, unlearned, x, y, device) -> dict:
        wrapped = attach_masks(unlearned)
        a = self.alpha
        train(unlearned, x, y, self._config(self.recover_epochs, self.recover_lr, 0.0), device=device,
              loss_fn=lambda out, xb, yb: a * F.cross_entropy(out, yb), parameters=[w.mask for w in wrapped.values()],
              after_step=clip_masks(wrapped), progress=self.progress, desc="rnp recover")
        return mask_values(wrapped)

    def _repair(self, model, data: CleanData, device):
        batchnorms(model)  # a model without BatchNorm2d (a ViT) fails here, not after the unlearning
        x, y = data.fit
        if self.n_images is not None and self.n_images < len(x):
            x, y = pick_images(x, y, self.n_images, self.seed, balanced=True)
        t0 = time.perf_counter()
        unlearned, history = self.unlearn(model, x, y, device)
        timings = {"unlearn": time.perf_counter() - t0}
        t0 = time.perf_counter()
        masks = self.recover_masks(unlearned, x, y, device)
        timings["recover"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        repaired, threshold, pruned, sweep = prune_by_threshold(model, masks, data, self.threshold, self.max_drop)
        timings["prune"] = time.perf_counter() - t0
        return self.result(repaired, timings, pruned=pruned, scores=masks, history=history,
                           extra={"threshold": threshold, "sweep": sweep,
                                  "unlearn_epochs_run": len(history)})
