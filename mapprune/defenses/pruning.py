"""Pruning feature maps: zero a conv filter and the gamma of the BatchNorm that normalises that conv's output;
optionally keep them zero through fine-tuning (a persistent mask). Everything is keyed by module name.

A feature map is one output channel of a layer (:mod:`mapprune.probes.layers`). Pruning a Linear channel zeroes
its weight row and bias entry, which makes that channel exactly zero for any input; no BatchNorm is zeroed with it.
"""

import torch
from torch import nn

from ..errors import MapPruneError
from ..probes.layers import MapLayer, following_batchnorms


class PruneMask:
    """Zeroes pruned channels now and, called after every optimiser step, keeps them exactly zero.

    ``pruned``: {Conv2d or Linear name: channels}. A conv's filter, a Linear's weight row, the bias entry and the
    gamma of the BatchNorm in ``batchnorms`` (conv name -> BatchNorm name) are all dimension 0 of their tensors.
    """

    def __init__(self, model: nn.Module, pruned: dict[str, list[int]], batchnorms: dict[str, str]):
        modules = dict(model.named_modules())
        self.targets = []  # (tensor, channel index tensor)
        for conv_name, channels in pruned.items():
            if not channels:
                continue
            if not isinstance(modules.get(conv_name), MapLayer):
                raise MapPruneError(f"cannot prune {conv_name!r}: it is not a Conv2d or nn.Linear of the model")
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
    """Prunes in place: zero each selected filter (or Linear row) and its following BatchNorm's gamma. Returns the
    mask."""
    mask = PruneMask(model, pruned, following_batchnorms(model, example))
    mask()
    return mask
