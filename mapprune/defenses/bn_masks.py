"""Per-channel masks (and ANP's neuron perturbations) on BatchNorm layers, shared by ANP and RNP, and pruning by
zeroing a BatchNorm channel's gamma.

A BatchNorm2d's output is ``gamma * x_hat + beta``. :class:`MaskedBatchNorm2d` wraps one and computes
``gamma * (mask + delta) * x_hat + beta * (1 + xi)``: ``mask`` (initialised to 1) is what the defenses learn;
``delta`` and ``xi`` are ANP's multiplicative and additive neuron noise, active only while ``perturbed``. The
wrappers go into a working copy of the model; pruning is then applied to a fresh copy of the original weights.

On pre-activation networks a BatchNorm sits before its conv: zeroing ``bn1``'s gamma silences a channel on the
residual branch (and the 1x1 shortcut conv) but not on the identity path. That is the methods' own semantics.
"""

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MapPruneError


class MaskedBatchNorm2d(nn.Module):
    def __init__(self, bn: nn.BatchNorm2d):
        super().__init__()
        self.bn = bn
        c = bn.num_features
        dev = bn.running_mean.device if bn.running_mean is not None else None
        self.mask = nn.Parameter(torch.ones(c, device=dev))
        self.delta = nn.Parameter(torch.zeros(c, device=dev))
        self.xi = nn.Parameter(torch.zeros(c, device=dev))
        self.perturbed = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.bn
        use_batch = self.training or bn.running_mean is None
        x_hat = F.batch_norm(x, bn.running_mean, bn.running_var, None, None, use_batch,
                             bn.momentum if bn.momentum is not None else 0.1, bn.eps)
        gamma = bn.weight if bn.weight is not None else torch.ones_like(self.mask)
        beta = bn.bias if bn.bias is not None else torch.zeros_like(self.mask)
        if self.perturbed:
            w, b = gamma * (self.mask + self.delta), beta * (1 + self.xi)
        else:
            w, b = gamma * self.mask, beta
        return x_hat * w.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)


def batchnorms(model: nn.Module) -> dict[str, nn.BatchNorm2d]:
    """The model's affine BatchNorm2d layers by name (what ANP and RNP mask and prune)."""
    bns = {n: m for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d) and m.weight is not None}
    if not bns:
        raise MapPruneError("the model has no affine BatchNorm2d layers; this defense masks BatchNorm channels (it "
                            "works on networks such as PreActResNet18, ResNet-18 and VGG-16-BN)")
    return bns


def attach_masks(model: nn.Module) -> dict[str, MaskedBatchNorm2d]:
    """Replaces every BatchNorm2d of ``model`` (in place: use a copy) by a masked wrapper; freezes the model's
    own weights. Returns the wrappers by the BatchNorm's module name."""
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = {}
    for name, bn in batchnorms(model).items():
        w = MaskedBatchNorm2d(bn)
        model.set_submodule(name, w)
        wrapped[name] = w
    return wrapped


def mask_values(wrapped: dict[str, MaskedBatchNorm2d]) -> dict[str, torch.Tensor]:
    return {name: w.mask.detach().float().cpu().clone() for name, w in wrapped.items()}


def clip_masks(wrapped: dict[str, MaskedBatchNorm2d]):
    """An ``after_step`` hook keeping every mask in [0, 1]."""
    @torch.no_grad()
    def clip(model=None):
        for w in wrapped.values():
            w.mask.clamp_(0, 1)
    return clip


def below(masks: dict[str, torch.Tensor], threshold: float) -> dict[str, list[int]]:
    """The channels whose mask is at most ``threshold``, per BatchNorm."""
    return {name: torch.nonzero(m <= threshold).flatten().tolist() for name, m in masks.items()
            if bool((m <= threshold).any())}


@torch.no_grad()
def zero_gamma(model: nn.Module, pruned: dict[str, list[int]]) -> nn.Module:
    """Prunes in place by setting those BatchNorm channels' gamma to 0 (beta is kept, as ANP and RNP do)."""
    modules = dict(model.named_modules())
    for name, channels in pruned.items():
        if channels:
            modules[name].weight[torch.tensor(channels, dtype=torch.long)] = 0.0
    return model
