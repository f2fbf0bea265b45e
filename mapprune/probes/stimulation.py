"""Feature-space stimulation: each map set directly to a high value, with no input perturbation.

FMT's probes excite a map through the input (a small patch, a 1-pixel warp, a smooth field). A trigger they cannot
draw (a blend over the whole image, a warp of another shape, a learned per-image pattern) leaves them blind: on
Blended, WaNet, Input-aware and SSBA their pull towards the real target is no larger than a clean model's pull
towards its natural attractor class. Stimulation skips the input: map c of layer l is set, at every position, to
its clean mean plus ``level`` clean standard deviations (in the direction its consumer passes on, as FMT's
``excite`` objective), the rest of the network runs as usual, and the predictions of the other classes' images are
recorded. This is ABS's neuron stimulation (Liu et al., CCS 2019) at the level of a whole feature map. A backdoor
has maps that, stimulated, send images of every class to its target; a clean model's maps scatter them over
several classes. Detection only: it changes nothing in a repair.

Per map and class j, the **share** is the fraction of the images not of class j predicted as j with the map
stimulated, minus the same fraction without stimulation. :func:`~.pull.target_from_pull` turns the (maps, K)
shares into the suspected target and its anomaly index, as for the probes' pulls.
"""

from collections import deque
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import MapPruneError
from ..images import as_unit
from .layers import channel_dim, consumer_signs, forward_hooks, layer_output, map_layers, num_maps

# The anomaly index above which the stimulation test calls a model backdoored (``mapprune scan``). Set without
# the backdoored models' targets: the clean CIFAR-10 models measured reach 1.5-2.2, and a class that is not the
# target reached 3.7 on one backdoored model (a spurious high, so the line sits above it). docs/fmt.md,
# "The stimulation test"; docs/results.md, "The scan".
ANOMALY_THRESHOLD = 4.0


@dataclass
class Stimulation:
    """``shares``: {layer name: (C, K)} (see the module docstring); ``level`` in clean standard deviations;
    ``labels``: the n images' true labels."""

    shares: dict[str, torch.Tensor]
    level: float
    labels: torch.Tensor

    def flat(self) -> torch.Tensor:
        """(all maps, K), the layers in order."""
        return torch.cat(list(self.shares.values()))


def _upstream(model: nn.Module, layer: nn.Module, x: torch.Tensor) -> tuple[list, torch.Tensor]:
    """Runs ``model`` on ``x`` as far as ``layer``: the (module, output) of every leaf module called before it, in
    call order, and ``layer``'s output."""
    calls = []

    def record(name, module, inputs, output):
        if isinstance(output, torch.Tensor):  # copied: a later in-place op must not change what is replayed
            calls.append((module, output.detach().clone()))

    leaves = {name: m for name, m in model.named_modules() if m is not layer and next(m.children(), None) is None}
    with forward_hooks(leaves, record):
        out = layer_output(model, layer, x)
    return calls, out


@contextmanager
def _replaying(calls: list, m: int):
    """While active, each module in ``calls`` returns, for its first calls, the recorded outputs repeated ``m``
    times along the batch instead of computing them; later calls compute as usual. Nothing before the stimulated
    layer depends on the stimulation, so the m blocks of a batch would all compute the same thing there: this
    skips that part of the network (most of it, for a deep layer) without knowing how the model is wired."""
    queues: dict[nn.Module, deque] = {}
    for module, output in calls:
        queues.setdefault(module, deque()).append(output)

    def replay(module, queue):
        def forward(*args, **kwargs):
            if queue:
                out = queue.popleft()
                return out.repeat(m, *[1] * (out.dim() - 1))
            return type(module).forward(module, *args, **kwargs)
        return forward

    for module, queue in queues.items():
        module.forward = replay(module, queue)
    try:
        yield
    finally:
        for module in queues:
            del module.forward


def _stimulator(chans: torch.Tensor, values: torch.Tensor, cd: int, n: int):
    """A forward hook for a batch of len(chans) blocks of the n images: block i gets map chans[i] set to
    values[i] at every position."""
    def hook(module, inputs, output):
        o = output.unflatten(0, (len(chans), n))
        d = cd + 1 if cd >= 0 else cd  # the channel dimension once the batch is split into blocks
        shape = [1] * o.dim()
        shape[0], shape[d] = len(chans), o.shape[d]
        hit = torch.nn.functional.one_hot(chans, o.shape[d]).bool().view(shape)
        fill = values.to(o.dtype).view([len(chans)] + [1] * (o.dim() - 1))
        return torch.where(hit, fill, o).flatten(0, 1)
    return hook


@torch.no_grad()
def stimulate_maps(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, level: float = 4.0,
                   batch_images: int = 1024, layers: list[str] | None = None,
                   progress: Callable[[int], None] | bool = False) -> Stimulation:
    """Stimulates every map of every tested layer (:func:`~.layers.map_layers`, or the names in ``layers``) on the
    ``images`` ((n, C, H, W), uint8 or float in [0, 1]) and returns the per-map, per-class shares. A chunk of maps
    runs as one batch of at most ``batch_images`` images (at least one map's n)."""
    if level <= 0:
        raise MapPruneError(f"level is a number of clean standard deviations > 0, got {level}")
    was_training = model.training
    model.eval()
    try:
        return _stimulate(model, images, labels, level, batch_images, layers, progress)
    finally:
        model.train(was_training)


def _stimulate(model, images, labels, level, batch_images, layers, progress) -> Stimulation:
    device = next(model.parameters()).device
    x = as_unit(images).to(device)
    y = torch.as_tensor(labels, dtype=torch.long).reshape(-1).to(device)
    n = len(x)
    logits = model(x)
    k = logits.shape[1]
    other = torch.nn.functional.one_hot(y, k).logical_not().float()  # (n, K): image i is not of class j
    denom = other.sum(0).clamp_min(1)
    base = (torch.nn.functional.one_hot(logits.argmax(1), k).float() * other).sum(0) / denom
    found = map_layers(model)
    if layers is not None:
        unknown = [name for name in layers if name not in found]
        if unknown:
            raise MapPruneError(f"no testable layer named {unknown[0]!r}; valid: {', '.join(found)}")
        found = {name: found[name] for name in layers}
    signs = consumer_signs(model, x[:1], found)
    per_batch = max(1, batch_images // n)
    tick, bar = progress if callable(progress) else None, None
    if progress is True:
        bar = tqdm(total=sum(num_maps(m) for m in found.values()), desc="stimulating feature maps", unit="map",
                   leave=False, dynamic_ncols=True)
        tick = bar.update
    shares = {}
    for name, layer in found.items():
        cd = channel_dim(layer)
        upstream, out = _upstream(model, layer, x)
        dims = [d for d in range(out.dim()) if d != cd % out.dim()]
        value = out.float().mean(dims) + level * signs[name].to(device) * out.float().std(dims)  # (C,)
        c_total = num_maps(layer)
        result = torch.empty(c_total, k)
        for start in range(0, c_total, per_batch):
            chans = torch.arange(start, min(start + per_batch, c_total), device=device)
            handle = layer.register_forward_hook(_stimulator(chans, value[chans], cd, n))
            try:
                with _replaying(upstream + [(layer, out)], len(chans)):
                    pred = model(x.repeat(len(chans), *[1] * (x.dim() - 1))).argmax(1).view(len(chans), n)
            finally:
                handle.remove()
            sent = (torch.nn.functional.one_hot(pred, k).float() * other).sum(1) / denom  # (maps, K)
            result[start:start + len(chans)] = (sent - base).cpu()
            if tick:
                tick(len(chans))
        shares[name] = result
    if bar is not None:
        bar.close()
    return Stimulation(shares, level, y.cpu())
