"""i-BAU, Implicit Backdoor Adversarial Unlearning (Zeng et al., ICLR 2022).

A minimax on the defender's clean subset (the original unlearns on test images; here only the defender's own data):

- inner, once per round: one universal perturbation delta (the image's shape) maximising CE(f(x + delta), f(x))
  minus ``inner_reg`` x |delta|^2, one pass of SGD at ``inner_lr`` over the clean subset (no norm bound, as in
  the released code; ``max_norm`` adds the L2 ball its comment mentions).
- outer, every batch of the round: minimise CE(f(x'), y), where x' adds delta to a share ``portion`` of the batch,
  by the implicit hypergradient: the inner problem's fixed point delta* = delta - ``inner_step`` x grad_delta
  L_inner(delta, theta) is differentiated through ``fixed_point_steps`` (K) iterations of the fixed-point map's
  vector-Jacobian product (the hypergrad library's ``fixed_point``). L_inner is evaluated on one fixed batch,
  as the released code does.

The hypergradient enters the one training loop as a surrogate loss: CE + <Phi(delta, theta), v> with v the
fixed-point solution held constant, whose gradient in theta is exactly the direct term plus the implicit term.
Model in eval mode throughout (BatchNorm statistics frozen), Adam lr 1e-4, batch 256, 5 rounds, K = 5, portion
0.01 (BackdoorBench's CIFAR-10 settings; the paper's objective perturbs every sample, its code 1% of each batch).
delta lives in pixel space (the released code's, whose models take raw pixels; BackdoorBench's is in normalised
space, so its 0.001 weight means something else). The last round is returned.
"""

import time

import torch
import torch.nn.functional as F

from ..errors import MapPruneError
from ..metrics import predict
from ..train import TrainConfig, train
from .base import CleanData, Defense


def hypergradient_loss(outer: torch.Tensor, leaf: torch.Tensor, inner, delta: torch.Tensor, step: float,
                       k: int) -> torch.Tensor:
    """A loss whose value is ``outer`` and whose gradient in the model's parameters is the implicit hypergradient
    of ``outer`` through the inner problem's fixed point: with Phi(d) = d - ``step`` x grad_d inner(d) at
    d = ``delta``, v solves v = (dPhi/dd)^T v + d outer / d leaf by ``k`` fixed-point iterations (from v = 0),
    and the gradient is d outer / d theta + (dPhi/dtheta)^T v. ``leaf`` is the tensor carrying delta into
    ``outer``'s graph."""
    g_out = torch.autograd.grad(outer, leaf, retain_graph=True, allow_unused=True)[0]
    if g_out is None:  # nothing in the batch carries delta: no implicit term
        return outer
    d = delta.detach().clone().requires_grad_(True)
    phi = d - step * torch.autograd.grad(inner(d), d, create_graph=True)[0]
    v = torch.zeros_like(d)
    for _ in range(k):
        v = torch.autograd.grad(phi, d, grad_outputs=v, retain_graph=True)[0] + g_out
    implicit = (phi * v.detach()).sum()
    return outer + implicit - implicit.detach()


class IBAU(Defense):
    name = "ibau"

    def __init__(self, *, rounds: int = 5, fixed_point_steps: int = 5, lr: float = 1e-4, batch_size: int = 256,
                 portion: float = 0.01, inner_lr: float = 10.0, inner_reg: float = 0.001, inner_step: float = 0.1,
                 max_norm: float | None = None, **kw):
        super().__init__(**kw)
        if rounds < 1 or fixed_point_steps < 1 or batch_size < 1 or lr <= 0 or inner_lr <= 0 or inner_step <= 0:
            raise MapPruneError("i-BAU needs rounds, fixed_point_steps, batch_size >= 1 and positive lr, inner_lr, "
                                f"inner_step; got {rounds}, {fixed_point_steps}, {batch_size}, {lr}, {inner_lr}, "
                                f"{inner_step}")
        if not 0 < portion <= 1 or inner_reg < 0 or (max_norm is not None and max_norm <= 0):
            raise MapPruneError(f"portion must be in (0, 1], inner_reg >= 0 and max_norm > 0 (or None); got "
                                f"{portion}, {inner_reg}, {max_norm}")
        self.rounds, self.fixed_point_steps, self.lr, self.batch_size = rounds, fixed_point_steps, lr, batch_size
        self.portion, self.inner_lr, self.inner_reg, self.inner_step = portion, inner_lr, inner_reg, inner_step
        self.max_norm = max_norm

    def perturbation(self, model, x: torch.Tensor, device) -> torch.Tensor:
        """The round's universal perturbation: one pass of SGD over ``x`` against the model's own predictions."""
        delta = torch.zeros(1, *x.shape[1:], device=device, requires_grad=True)
        pred = predict(model, x, batch_size=512, amp=False)
        reg = self.inner_reg
        cfg = TrainConfig(epochs=1, batch_size=self.batch_size, lr=self.inner_lr, momentum=0.0, weight_decay=0.0,
                          schedule="constant", augment=False, freeze_bn=True, amp=False, seed=self.seed)
        grads = [p.requires_grad for p in model.parameters()]
        for p in model.parameters():
            p.requires_grad_(False)
        try:
            train(model, x, pred, cfg, device=device, parameters=[delta], progress=False,
                  transform=lambda xb, yb, g: (xb + delta, yb),
                  loss_fn=lambda out, xb, yb: -F.cross_entropy(out.float(), yb) + reg * delta.pow(2).sum())
        finally:
            for p, r in zip(model.parameters(), grads):
                p.requires_grad_(r)
        delta = delta.detach()
        if self.max_norm is not None:
            delta = delta * min(1.0, self.max_norm / max(float(delta.norm()), 1e-12))
        return delta

    def _repair(self, model, data: CleanData, device):
        x, y = data.x, data.y
        g = torch.Generator().manual_seed(self.seed)
        first = torch.randperm(len(x), generator=g)[:self.batch_size]
        x_in, y_in = x[first].to(device).float().div(255), y[first].to(device)  # L_inner's fixed batch
        state = {"delta": None, "norms": []}
        t_inner = [0.0]

        def before_epoch(model, epoch):
            t0 = time.perf_counter()
            state["delta"] = self.perturbation(model, x, device)
            state["norms"].append(round(float(state["delta"].norm()), 4))
            t_inner[0] += time.perf_counter() - t0

        def transform(xb, yb, gen):
            leaf = state["delta"].clone().requires_grad_(True)
            state["leaf"] = leaf
            n = int(self.portion * len(xb))
            if n == 0:
                return xb, yb
            idx = torch.randperm(len(xb), generator=gen)[:n].to(xb.device)
            xb = xb.clone()
            xb[idx] = xb[idx] + leaf
            return xb, yb

        def loss_fn(out, xb, yb):
            outer = F.cross_entropy(out.float(), yb)

            def inner(d):
                return -F.cross_entropy(model(x_in + d).float(), y_in) + self.inner_reg * d.pow(2).sum()
            return hypergradient_loss(outer, state["leaf"], inner, state["delta"], self.inner_step,
                                      self.fixed_point_steps)

        cfg = TrainConfig(epochs=self.rounds, batch_size=self.batch_size, lr=self.lr, weight_decay=0.0,
                          schedule="constant", optimizer="adam", freeze_bn=True, amp=False, hflip=self.hflip,
                          seed=self.seed)
        t0 = time.perf_counter()
        history = train(model, x, y, cfg, device=device, before_epoch=before_epoch, transform=transform,
                        loss_fn=loss_fn, progress=self.progress, desc="i-bau")
        total = time.perf_counter() - t0
        return self.result(model, {"perturbation": t_inner[0], "unlearn": total - t_inner[0]}, history=history,
                           extra={"perturbation_norms": state["norms"]})
