"""Pruning feature maps: zero a conv filter and the gamma of the BatchNorm that normalises that conv's output;
optionally keep them zero through fine-tuning (a persistent mask). Everything is keyed by module name.
"""

import torch
from torch import nn

from ..errors import MapPruneError


def conv_layers(model: nn.Module) -> dict[str, nn.Conv2d]:
    """Every Conv2d of the model by module name, in registration order (1x1 shortcut convs included)."""
    convs = {name: m for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    if not convs:
        raise MapPruneError("the model has no Conv2d layers; feature map testing needs a convolutional network")
    return convs


@torch.no_grad()
def following_batchnorms(model: nn.Module, example: torch.Tensor) -> dict[str, str]:
    """Maps each conv's name to the BatchNorm2d that takes that conv's output directly as its input.

    Found by running one forward pass and matching tensors by identity, so it works for any architecture
    without tracing. Convs whose output goes into a sum first (PreAct residual convs) have no such BatchNorm:
    normalising the sum is not normalising that conv, and zeroing it would prune other layers' maps too.
    """
    produced: dict[int, str] = {}
    found: dict[str, str] = {}
    handles = []
    names = {m: n for n, m in model.named_modules()}
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(lambda mod, i, o: produced.__setitem__(id(o), names[mod])))
        elif isinstance(m, nn.BatchNorm2d):
            def pre(mod, inputs):
                conv = produced.get(id(inputs[0]))
                if conv is not None and conv not in found and mod.num_features == inputs[0].shape[1]:
                    found[conv] = names[mod]
            handles.append(m.register_forward_pre_hook(pre))
    was_training = model.training
    model.eval()
    try:
        model(example[:1])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return found


class PruneMask:
    """Zeroes pruned channels now and, called after every optimiser step, keeps them exactly zero."""

    def __init__(self, model: nn.Module, pruned: dict[str, list[int]], batchnorms: dict[str, str]):
        modules = dict(model.named_modules())
        self.targets = []  # (tensor, channel index tensor)
        for conv_name, channels in pruned.items():
            if not channels:
                continue
            idx = torch.tensor(sorted(channels), dtype=torch.long)
            conv = modules[conv_name]
            self.targets.append((conv.weight, idx))
            if conv.bias is not None:
                self.targets.append((conv.bias, idx))
            bn_name = batchnorms.get(conv_name)
            if bn_name is not None and modules[bn_name].weight is not None:
                self.targets.append((modules[bn_name].weight, idx))

    @torch.no_grad()
    def __call__(self, model: nn.Module | None = None) -> None:
        for tensor, idx in self.targets:
            tensor.index_fill_(0, idx.to(tensor.device), 0.0)


def prune(model: nn.Module, pruned: dict[str, list[int]], example: torch.Tensor) -> PruneMask:
    """Prunes in place: zero each selected filter and its following BatchNorm's gamma. Returns the mask."""
    mask = PruneMask(model, pruned, following_batchnorms(model, example))
    mask()
    return mask
