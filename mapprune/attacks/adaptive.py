"""Adaptive attacks that know FMT: a fixed trigger (BadNets or Blended by default) trained with a regulariser added
to the cross-entropy through the training loop's ``loss_fn``.

- ``distributed``: penalises the largest per-map shift between triggered and clean images (the spatial mean of
  each conv map, as a z-score over the clean images, the measure ``mapprune diagnose`` calls the trigger
  response), so no small set of maps carries the backdoor and pruning a few maps cannot remove it.
- ``fmt-evasive``: penalises what FMT's recommended recipe reads: for a few random maps per step, FMT's own patch
  probe (the universal 5x5 patch that excites that map most, :func:`~mapprune.probes.find_patches`)
  is stamped on clean images and the model's probability of the target class on them is penalised, so no map's
  probe pulls towards the target and FMT neither finds the target nor good candidate triggers to unlearn.

Both take ``base`` (the trigger's attack, any registered attack without a learned resource) and ``base_opts``;
``weight`` scales the penalty, ``sample`` is how many clean images of each batch it uses. Defaults (distributed:
weight 0.3, margin 2; fmt-evasive: weight 2, 32 maps of one random layer per step, 16 images) were chosen on the
8x8 digits with a 2-pixel BadNets patch (tests/test_adaptive_attacks.py): distributed halves the largest per-map
shift (7.7 -> 3.7) at ASR 95% (plain 99.8%); fmt-evasive keeps ASR 99.8% while the largest pull of FMT's probes
towards the target falls from 0.84 to 0.11 and FMT's target estimate goes to another class. A stronger weight
trades ASR away (distributed 1.0: ASR 88%). Training costs more: distributed one extra forward of ``2 * sample``
images per step, fmt-evasive ``maps`` backward passes and a forward of ``maps * sample`` images.
"""

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MapPruneError
from ..probes import default_patch, find_patches, layer_output, recorded_outputs
from .base import Attack


def conv_outputs(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The model's logits on ``x`` and every Conv2d's output by module name (one forward, gradients kept)."""
    convs = {name: m for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    with recorded_outputs(convs) as outs:
        logits = model(x)
    return logits, outs


def map_shifts(clean: dict[str, torch.Tensor], triggered: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per layer and map, |shift of the map's spatial mean| between triggered and clean images, divided by the
    map's spread over the clean images (a z-score): {name: (C,)}. Differentiable."""
    out = {}
    for name, a in clean.items():
        ma, mb = a.float().mean((2, 3)), triggered[name].float().mean((2, 3))  # (n, C)
        out[name] = (mb.mean(0) - ma.mean(0)).abs() / ma.std(0).clamp_min(1e-3)
    return out


class RegularisedAttack(Attack):
    """A base attack's trigger and poisoning, plus :meth:`penalty` added to its training loss."""

    name = "regularised"

    def __init__(self, image_shape, num_classes, *, base: str = "badnets", base_opts: dict | None = None,
                 weight: float = 1.0, sample: int = 32, **kw):
        # lazy: import cycle (mapprune.attacks imports this module before it defines create_attack)
        from . import attack_class, create_attack
        from .multi import MultiAttack

        super().__init__(image_shape, num_classes, **kw)
        if issubclass(attack_class(base), RegularisedAttack | MultiAttack):
            raise MapPruneError(f"{self.name}'s base is a plain trigger attack, not {base!r}")
        if weight < 0 or sample < 2:
            raise MapPruneError(f"weight must be >= 0 and sample >= 2, got weight={weight}, sample={sample}")
        self.inner = create_attack(base, image_shape, num_classes, target=self.target, all_to_all=self.all_to_all,
                                   poison_ratio=self.poison_ratio, **(base_opts or {}))
        if self.inner.clean_label or type(self.inner).prepare is not Attack.prepare:
            raise MapPruneError(f"{self.name} regularises a fixed dirty-label trigger; {base} is clean-label or "
                                "learns a resource")
        self.base, self.weight, self.sample = base, weight, sample
        self.state_names = self.inner.state_names

    def params(self) -> dict:
        return {"base": self.base, "base_opts": self.inner.params(), "weight": self.weight, "sample": self.sample}

    def trigger(self, x):
        return self.inner.trigger(x)

    def state(self):
        return self.inner.state()

    def load_state(self, tensors):
        self.inner.load_state(tensors)

    def penalty(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def clean_sample(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Up to ``sample`` images of the batch that are not labelled with the target (so not poisoned ones)."""
        keep = torch.nonzero(y != self.target).flatten()[:self.sample]
        return x[keep]

    def training_loss(self, model: nn.Module):
        def loss(logits, x, y):
            ce = F.cross_entropy(logits, y)
            if self.weight == 0:
                return ce
            return ce + self.weight * self.penalty(model, x, y)
        return loss


class DistributedAttack(RegularisedAttack):
    name = "distributed"

    def __init__(self, image_shape, num_classes, *, margin: float = 2.0, weight: float = 0.3, **kw):
        super().__init__(image_shape, num_classes, weight=weight, **kw)
        if margin < 0:
            raise MapPruneError(f"margin is a z-score >= 0, got {margin}")
        self.margin = margin

    def params(self):
        return {**super().params(), "margin": self.margin}

    def penalty(self, model, x, y):
        xc = self.clean_sample(x, y)
        if len(xc) < 2:
            return x.new_zeros(())
        _, outs = conv_outputs(model, torch.cat([xc, self.trigger(xc)]))
        n = len(xc)
        z = map_shifts({k: v[:n] for k, v in outs.items()}, {k: v[n:] for k, v in outs.items()})
        # Only the part of each layer's largest shift above ``margin``: the backdoor may shift many maps a little.
        return torch.stack([F.relu(v.max() - self.margin) for v in z.values()]).mean()


class FMTEvasiveAttack(RegularisedAttack):
    name = "fmt-evasive"

    def __init__(self, image_shape, num_classes, *, maps: int = 32, sample: int = 16, weight: float = 2.0, **kw):
        super().__init__(image_shape, num_classes, sample=sample, weight=weight, **kw)
        if maps < 1:
            raise MapPruneError(f"maps must be >= 1, got {maps}")
        self.maps = maps
        self._g = torch.Generator().manual_seed(0)

    def params(self):
        return {**super().params(), "maps": self.maps}

    def probe_images(self, model: nn.Module, xc: torch.Tensor) -> torch.Tensor:
        """FMT's patch probe for ``maps`` random maps of one random conv layer, stamped on ``xc``: (maps * n, ...),
        detached. Made in eval mode, as FMT tests a model."""
        convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
        name, layer = convs[int(torch.randint(len(convs), (1,), generator=self._g))]
        k = min(self.maps, layer.out_channels)
        channels = torch.randperm(layer.out_channels, generator=self._g)[:k].tolist()
        was = model.training
        model.eval()
        try:
            with torch.enable_grad():
                x0 = xc.detach().requires_grad_(True)
                out = layer_output(model, layer, x0)
                grads = [torch.autograd.grad(out[:, c].mean(), x0, retain_graph=i < k - 1)[0]
                         for i, c in enumerate(channels)]
        finally:
            model.train(was)
        patches = find_patches(torch.stack(grads).detach(), default_patch(xc.shape))
        which = torch.arange(k, device=xc.device).repeat_interleave(len(xc))
        return patches.stamp(xc.detach().repeat(k, 1, 1, 1), which)

    def penalty(self, model, x, y):
        xc = self.clean_sample(x, y)
        if len(xc) == 0:
            return x.new_zeros(())
        probed = self.probe_images(model, xc)
        return model(probed).float().softmax(1)[:, self.target].mean()
