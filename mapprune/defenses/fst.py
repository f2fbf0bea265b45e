"""FST, Feature Shift Tuning (Min et al., NeurIPS 2023).

1. Re-initialise the classifier (the last nn.Linear) uniformly in +-1/sqrt(d), bias to zero.
2. Fine-tune every layer with CE + ``alpha`` x <W, W_orig> (the inner product of the new classifier weights with
   the original, backdoored ones): the head is pushed away from the compromised one, and the features must shift
   with it, which moves the backdoor features too.
3. After every step the classifier weights are rescaled to the original's norm (the released code does this in
   every mode), so the inner product cannot be lowered by shrinking W.

Defaults are the released code's CIFAR-10 ones: SGD lr 0.01, momentum 0.9, no weight decay, cosine over 10
epochs, batch 128, alpha 0.1 (its README's CIFAR-10 setting; the argparse default is 0.2). The last epoch is
returned.
"""

import math
import time

import torch
import torch.nn.functional as F

from ..errors import MapPruneError
from ..train import TrainConfig, train
from .base import CleanData, Defense
from .fp import classifier_head


class FST(Defense):
    name = "fst"

    def __init__(self, *, alpha: float = 0.1, epochs: int = 10, lr: float = 0.01, batch_size: int = 128,
                 weight_decay: float = 0.0, **kw):
        super().__init__(**kw)
        if alpha < 0 or epochs < 1 or lr <= 0 or batch_size < 1 or weight_decay < 0:
            raise MapPruneError("FST needs alpha >= 0, epochs and batch_size >= 1, lr > 0, weight_decay >= 0; got "
                                f"{alpha}, {epochs}, {batch_size}, {lr}, {weight_decay}")
        self.alpha, self.epochs, self.lr, self.batch_size, self.weight_decay = alpha, epochs, lr, batch_size, weight_decay

    def _repair(self, model, data: CleanData, device):
        head_name, head = classifier_head(model)
        w_orig = head.weight.detach().clone()
        norm = w_orig.norm()
        g = torch.Generator().manual_seed(self.seed)
        with torch.no_grad():
            bound = 1 / math.sqrt(head.in_features)
            head.weight.copy_(torch.rand(head.weight.shape, generator=g).mul_(2 * bound).sub_(bound))
            if head.bias is not None:
                head.bias.zero_()
        a = self.alpha

        def loss_fn(out, xb, yb):
            return F.cross_entropy(out, yb) + a * (head.weight * w_orig).sum()

        @torch.no_grad()
        def rescale(model):
            head.weight.mul_(norm / head.weight.norm())

        cfg = TrainConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, momentum=0.9,
                          weight_decay=self.weight_decay, schedule="cosine", hflip=self.hflip, seed=self.seed)
        w_orig = w_orig.to(device)
        t0 = time.perf_counter()
        history = train(model, data.x, data.y, cfg, device=device, loss_fn=loss_fn, after_step=rescale,
                        progress=self.progress, desc="fst fine-tune")
        cosine = float(F.cosine_similarity(head.weight.detach().flatten(), w_orig.flatten(), dim=0))
        return self.result(model, {"finetune": time.perf_counter() - t0}, history=history,
                           extra={"head": head_name, "head_cosine_to_original": round(cosine, 4)})
