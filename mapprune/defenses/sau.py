"""SAU, Shared Adversarial Unlearning (Wei et al., NeurIPS 2023).

The backdoor risk is bounded by the risk on *shared* adversarial examples: perturbations that fool both the
original backdoored model h0 (a frozen copy) and the model being purified, h, into the same wrong class. Every
batch of every round:

1. Shared PGD, per image, in pixel space: delta starts at +``eps`` everywhere, then ``pgd_steps`` signed steps of
   ``step_size``, each projected on the L-inf ball of ``eps``, minimising
   ``beta1`` x L_adv + ``beta2`` x L_share, where L_adv = -1/2 (CE of h + CE of h0) summed over the images not
   yet misclassified by each, and L_share = the Jensen-Shannon divergence between h's and h0's predictions summed
   over the images not yet shared adversarial, both divided by the batch size (BackdoorBench's scaling). Stops
   early once every image is shared adversarial.
2. One Adam step (lr 1e-4) on h for the batch [x, x + delta]: ``lmd1`` x CE(h(x)) + ``lmd2`` x CE(h(x + delta))
   + ``lmd3`` x L_sh, with L_sh = -mean over the images where h0 is fooled (h0(x + delta) differs from y and from
   h0(x)) of log(1 - p_h(h0(x + delta) | x + delta)).

Both models in eval mode (BatchNorm frozen), no augmentation (BackdoorBench's test transform), last round
returned. BackdoorBench's CIFAR-10 defaults: 100 rounds, batch 256, eps = step 0.2, 5 steps, beta 0.01 / 1,
lambda 1 / 0 / 1. BackdoorBench never clips x + delta to valid pixels; here ``clip`` (default on) keeps the
shared adversarial examples images (``--opt clip=false`` for BackdoorBench's). Cost: ~15 forward/backward passes
per batch, ~10-16x a fine-tune of the same length; on a CPU ``--opt rounds=N`` (docs/results.md says which N).
"""

import copy
import time

import torch
import torch.nn.functional as F

from ..errors import MapPruneError
from ..train import TrainConfig, train
from .base import CleanData, Defense


def js_divergence(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """Per-sample Jensen-Shannon divergence between two softmax distributions."""
    p, q = F.softmax(logits_a.float(), 1), F.softmax(logits_b.float(), 1)
    m = ((p + q) / 2).clamp_min(1e-12)
    return 0.5 * ((p * (p.clamp_min(1e-12) / m).log()).sum(1) + (q * (q.clamp_min(1e-12) / m).log()).sum(1))


class SAU(Defense):
    name = "sau"

    def __init__(self, *, rounds: int = 100, lr: float = 1e-4, batch_size: int = 256, eps: float = 0.2,
                 step_size: float = 0.2, pgd_steps: int = 5, beta1: float = 0.01, beta2: float = 1.0,
                 lmd1: float = 1.0, lmd2: float = 0.0, lmd3: float = 1.0, clip: bool = True, **kw):
        super().__init__(**kw)
        if rounds < 1 or batch_size < 1 or pgd_steps < 1 or lr <= 0 or eps <= 0 or step_size <= 0:
            raise MapPruneError("SAU needs rounds, batch_size, pgd_steps >= 1 and positive lr, eps, step_size; got "
                                f"{rounds}, {batch_size}, {pgd_steps}, {lr}, {eps}, {step_size}")
        if min(beta1, beta2, lmd1, lmd2, lmd3) < 0:
            raise MapPruneError(f"the loss weights must be >= 0, got beta {beta1}, {beta2}, lambda {lmd1}, {lmd2}, {lmd3}")
        self.rounds, self.lr, self.batch_size, self.eps, self.step_size = rounds, lr, batch_size, eps, step_size
        self.pgd_steps, self.beta1, self.beta2 = pgd_steps, beta1, beta2
        self.lmd1, self.lmd2, self.lmd3, self.clip = lmd1, lmd2, lmd3, clip

    def shared_pgd(self, h, h0, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-image perturbations fooling h and h0 into the same class (see the module docstring)."""
        delta = torch.full_like(x, self.eps)
        for _ in range(self.pgd_steps):
            delta.requires_grad_(True)
            xa = (x + delta).clamp(0, 1) if self.clip else x + delta
            out, out0 = h(xa), h0(xa)
            pred, pred0 = out.argmax(1), out0.argmax(1)
            shared = (pred == pred0) & (pred != y)
            if bool(shared.all()):
                break
            right, right0 = pred == y, pred0 == y
            b = len(x)  # both terms over the whole batch, as BackdoorBench's: only their ratio matters to a signed step
            adv = -(F.cross_entropy(out[right].float(), y[right], reduction="sum")
                    + F.cross_entropy(out0[right0].float(), y[right0], reduction="sum")) / (2 * b)
            share = js_divergence(out, out0)[~shared].sum() / b
            grad = torch.autograd.grad(self.beta1 * adv + self.beta2 * share, delta)[0]
            delta = (delta.detach() - self.step_size * grad.sign()).clamp(-self.eps, self.eps)
        delta = delta.detach()
        return (x + delta).clamp(0, 1) if self.clip else x + delta

    def _repair(self, model, data: CleanData, device):
        h0 = copy.deepcopy(model).eval()
        for p in h0.parameters():
            p.requires_grad_(False)
        state = {}

        def transform(xb, yb, g):
            xa = self.shared_pgd(model, h0, xb, yb)
            with torch.no_grad():
                state["pred0"], state["pred0_adv"] = h0(xb).argmax(1), h0(xa).argmax(1)
            return torch.cat([xb, xa]), torch.cat([yb, yb])

        def loss_fn(out, xb, yb):
            n = len(out) // 2
            clean, adv, y = out[:n].float(), out[n:].float(), yb[:n]
            loss = self.lmd1 * F.cross_entropy(clean, y)
            if self.lmd2 > 0:
                loss = loss + self.lmd2 * F.cross_entropy(adv, y)
            fooled = (state["pred0_adv"] != y) & (state["pred0_adv"] != state["pred0"])
            if self.lmd3 > 0 and fooled.any():
                # log(1 - p) kept finite without flattening it where p is near 1 (the confidently backdoored shared
                # examples, the ones that matter): BackdoorBench's two bounded forms, averaged
                p = F.softmax(adv, 1).gather(1, state["pred0_adv"][:, None])[:, 0]
                log_rest = 0.5 * (torch.log(1e-6 + (1 - p).clamp(max=0.999)) + torch.log(1 + 1e-6 - p.clamp(min=1e-3)))
                loss = loss - self.lmd3 * (log_rest * fooled).sum() / n
            return loss

        cfg = TrainConfig(epochs=self.rounds, batch_size=self.batch_size, lr=self.lr, weight_decay=0.0,
                          schedule="constant", optimizer="adam", freeze_bn=True, augment=False, amp=False,
                          seed=self.seed)
        t0 = time.perf_counter()
        history = train(model, data.x, data.y, cfg, device=device, transform=transform, loss_fn=loss_fn,
                        progress=self.progress, desc="sau")
        return self.result(model, {"unlearn": time.perf_counter() - t0}, history=history)
