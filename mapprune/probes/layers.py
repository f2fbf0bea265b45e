"""The layers whose feature maps are tested, and how to reach a layer's output.

A feature map is one output channel of a layer over everything else in its output: a Conv2d's channel c is
``out[:, c]`` over all positions; an nn.Linear's output channel (feature) c is ``out[..., c]`` over all tokens
(a transformer's (N, T, D) output) or the batch alone ((N, D)).
"""

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from functools import partial

import torch
from torch import nn

from ..errors import MapPruneError


@contextmanager
def forward_hooks(modules: Mapping[str, nn.Module], hook: Callable) -> Iterator[None]:
    """While active, ``hook(name, module, inputs, output)`` runs after every forward call of each of ``modules``
    (name -> module); what it returns, when not None, replaces the output, as a forward hook's does. The hooks are
    removed on leaving, an error included."""
    handles = [m.register_forward_hook(partial(hook, name)) for name, m in modules.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def recorded_outputs(modules: Mapping[str, nn.Module]) -> Iterator[dict[str, torch.Tensor]]:
    """While active, the dict it yields holds each of ``modules``' latest output by name (gradients kept)."""
    outputs: dict[str, torch.Tensor] = {}
    with forward_hooks(modules, lambda name, mod, inputs, output: outputs.__setitem__(name, output)):
        yield outputs


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


def feature_map(out: torch.Tensor, layer: MapLayer, channel: int) -> torch.Tensor:
    """Map ``channel`` of ``layer``'s output ``out``: a conv's out[:, c], a Linear's out[..., c]."""
    return out.select(channel_dim(layer), channel)


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the layer of interest has run."""


def layer_output(model: nn.Module, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Runs ``model`` on ``x`` only as far as ``layer`` and returns that layer's output (its first call's, for a
    layer called more than once); the rest of the model does not run."""
    box = {}

    def hook(mod, inputs, output):
        box["out"] = output
        raise _Stop

    handle = layer.register_forward_hook(hook)
    try:
        model(x)
    except _Stop:
        pass
    finally:
        handle.remove()
    if "out" not in box:
        raise MapPruneError("a tested layer never ran in the forward pass; FMT can only test layers the model uses")
    return box["out"]


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


def consumer_signs(model: nn.Module, example: torch.Tensor, layers: dict[str, MapLayer]) -> dict[str, torch.Tensor]:
    """Per layer and channel, the sign with which the next BatchNorm passes the map on (the sign of its gamma);
    +1 where no BatchNorm reads the conv's output directly (residual convs, VGG's last layers without one) and
    for every Linear (a LayerNorm, or nothing, reads it: no per-channel sign to follow)."""
    bns = following_batchnorms(model, example)
    modules = dict(model.named_modules())
    signs = {}
    for name, layer in layers.items():
        s = torch.ones(num_maps(layer))
        bn = modules[bns[name]] if name in bns else None
        if bn is not None and bn.weight is not None:
            s = torch.where(bn.weight.detach().cpu() < 0, -1.0, 1.0)
        signs[name] = s
    return signs
