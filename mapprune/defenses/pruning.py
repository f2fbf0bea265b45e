"""Pruning feature maps: zero a conv filter and the gamma of the BatchNorm that normalises that conv's output;
optionally keep them zero through fine-tuning (a persistent mask). Everything is keyed by module name.

A feature map is one output channel of a layer over everything else in its output: a Conv2d's channel c is
``out[:, c]`` over all positions; an nn.Linear's output channel (feature) c is ``out[..., c]`` over all tokens
(a transformer's (N, T, D) output) or the batch alone ((N, D)). Pruning a Linear channel zeroes its weight row
and bias entry, which makes that channel exactly zero for any input; no BatchNorm is zeroed with it.
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


MapLayer = nn.Conv2d | nn.Linear


def map_layers(model: nn.Module) -> dict[str, MapLayer]:
    """The layers whose feature maps FMT tests and prunes, by module name in registration order: every Conv2d and
    every nn.Linear except the classifier head.

    The head is the last nn.Linear registered (as FP, NC and FST take it): its outputs are the logits, not
    features. A CNN whose only Linear is its head (every CNN of the registry) gets exactly :func:`conv_layers`;
    a transformer gets its patch embedding and every projection and MLP layer. The projections inside an
    nn.MultiheadAttention are left out: it uses their weights without calling them, so they never run as
    modules.
    """
    named = list(model.named_modules())
    linears = [n for n, m in named if isinstance(m, nn.Linear)]
    head = linears[-1] if linears else None
    fused = tuple(n + "." for n, m in named if isinstance(m, nn.MultiheadAttention))
    layers = {n: m for n, m in named
              if isinstance(m, nn.Conv2d) or isinstance(m, nn.Linear) and n != head and not n.startswith(fused)}
    if not layers:
        raise MapPruneError("the model has no Conv2d layers and no nn.Linear besides its classifier head; feature "
                            "map testing needs convolutions or a transformer's linear layers")
    return layers


def num_maps(layer: MapLayer) -> int:
    """How many feature maps (output channels) the layer has."""
    return layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features


def channel_dim(layer: MapLayer) -> int:
    """The axis of the layer's output that indexes its maps: 1 for a conv's (N, C, H, W), -1 for a Linear's."""
    return 1 if isinstance(layer, nn.Conv2d) else -1


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
