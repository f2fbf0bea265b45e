"""Re-activation by input: one universal perturbation, added to triggered images, that brings a dormant backdoor
back (Zhu et al., NeurIPS 2024, "Breaking the False Sense of Security in Backdoor Defense through Re-Activation
Attack", its white-box attack).

The search is projected gradient descent on a single pixel-space tensor ``delta`` with ``||delta||_inf <= eps``
(the paper's rho = 0.05 on [0, 1] pixels): minimise the cross-entropy of ``model(clamp(x + delta, 0, 1))`` to the
target over a set of the attacker's images, with sign steps of ``step`` and projection after each. Where ours
differs: the images are cycled in shuffled mini-batches (the paper does not fix the schedule); the step is
``eps / 10`` by default, so the budget is reached in ten steps and refined for the rest.

Run on *triggered* images it is the re-activation attack; run on the same images *without* the trigger it is the
paper's control, a generic targeted universal adversarial perturbation (gUAA): a repaired model whose backdoor is
only dormant gives the first a much higher target rate than the second, and a clean model gives neither.
This is an evaluation of a defense, with the real trigger; never part of one.
"""

import math

import torch
from torch import nn
from torch.nn import functional as F


def universal_perturbation(model: nn.Module, images: torch.Tensor, target: torch.Tensor, *, eps: float = 0.05,
                           steps: int = 100, step: float | None = None, batch_size: int = 128, seed: int = 0,
                           device=None, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """The perturbation (C, H, W), or ``shape``, float in [-eps, eps], that sends ``images`` (uint8, N x C x H x W)
    to ``target`` (labels, N) through ``model`` (which takes [0, 1] pixels). ``model`` is left as it was (eval mode
    inside).
    ``shape``: a smaller shape that broadcasts over (C, H, W), for a structured perturbation (``(1, 1, W)``: one
    value per column, the same on every row and channel, as SIG's stripes are)."""
    if not (math.isfinite(eps) and eps > 0) or steps < 1 or batch_size < 1 or len(images) == 0:
        raise ValueError(f"eps > 0, steps >= 1, batch_size >= 1 and images needed; got eps={eps}, steps={steps}, "
                         f"batch_size={batch_size}, {len(images)} images")
    step = eps / 10 if step is None else step
    shape = tuple(images.shape[1:]) if shape is None else tuple(shape)
    if torch.broadcast_shapes(shape, images.shape[1:]) != images.shape[1:]:
        raise ValueError(f"shape {shape} does not broadcast over the images' {tuple(images.shape[1:])}")
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():  # only delta gets gradients; the flags are restored below
        p.requires_grad_(False)
    delta = torch.zeros(shape, device=device)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(images), generator=g)
    try:
        for i in range(steps):
            start = (i * batch_size) % len(images)
            if start < batch_size and i:  # a new pass over the images: a new order
                order = torch.randperm(len(images), generator=g)
            idx = order[start:start + batch_size]
            x = images[idx].to(device).float().div_(255)
            delta.requires_grad_(True)
            loss = F.cross_entropy(model((x + delta).clamp(0, 1)), target[idx].to(device))
            (grad,) = torch.autograd.grad(loss, delta)
            with torch.no_grad():
                delta = (delta - step * grad.sign()).clamp_(-eps, eps)
    finally:
        for p, flag in zip(model.parameters(), flags):
            p.requires_grad_(flag)
        model.train(was_training)
    return delta.detach().cpu()


def perturbed(images: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``images`` (uint8) with ``delta`` added in [0, 1] pixel space, clamped and quantised back to uint8 (what an
    attacker can actually submit)."""
    x = images.float().div(255).add_(delta).clamp_(0, 1)
    return x.mul_(255).round_().to(torch.uint8)
