"""NAD, Neural Attention Distillation (Li et al., ICLR 2021).

1. Teacher: a copy of the backdoored model fine-tuned on the clean subset with the cross-entropy for
   ``teacher_epochs``.
2. Student: the backdoored model, trained for ``epochs`` with CE + sum_l beta_l * AT_l(student, teacher), where
   AT_l is the mean squared difference of the two models' attention maps at layer l. An attention map is the
   channel mean of |feature|^p (p = 2), flattened and L2-normalised over the positions.
3. The last epoch is returned (no selection).

Layers: the outputs of the network's last three stages (the paper's residual groups; on a ResNet ``layer2``,
``layer3``, ``layer4``; on a plain CNN the last three stage ends before a pooling, and the last feature layer).
BackdoorBench's PreActResNet18 port reads avgpool, layer4 and layer3, and the term on the 1x1 pooled map is
identically zero (a single position normalised is constant): its NAD effectively has no third term. Not copied.
Defaults are BackdoorBench's: 10 + 10 epochs, SGD lr 0.01 (its cosine over T_max 100 barely decays in 10
epochs: a constant lr here), momentum 0.9, weight decay 5e-4, batch 256, betas 500/1000/1000 from the lowest
layer up.
"""

import copy
import time

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MapPruneError
from ..train import TrainConfig, train
from .base import CleanData, Defense


def stage_outputs(model: nn.Module, n: int = 3) -> list[str]:
    """Names of the modules whose outputs end the model's last ``n`` stages (fewer if it has fewer): a ResNet's
    ``layerK`` groups, else the module before each pooling of a plain CNN's feature stack plus its last module."""
    names = dict(model.named_modules())
    groups = sorted(k for k in names if k.rsplit(".", 1)[-1] in ("layer1", "layer2", "layer3", "layer4"))
    if len(groups) >= n:
        return groups[-n:]
    ends = []
    for prefix, m in model.named_modules():
        if isinstance(m, nn.Sequential):
            kids = list(m.named_children())
            for i, (name, child) in enumerate(kids):
                pooled = i + 1 < len(kids) and isinstance(kids[i + 1][1], (nn.MaxPool2d, nn.AvgPool2d))
                last = i + 1 == len(kids) and not isinstance(child, (nn.MaxPool2d, nn.AvgPool2d))
                if pooled or last and any(isinstance(c, nn.Conv2d) for _, c in kids):
                    ends.append(f"{prefix}.{name}" if prefix else name)
    if not ends:
        raise MapPruneError("cannot tell this model's stages; give NAD the layers to distil (layers=[...], one per "
                            "beta, e.g. a transformer's last encoder blocks: net.blocks.1, net.blocks.2, net.blocks.3)")
    return list(dict.fromkeys(ends))[-n:]


def attention(feature: torch.Tensor, p: float) -> torch.Tensor:
    """(N, H*W) the L2-normalised channel mean of |feature|^p; (N, tokens) for a transformer's (N, tokens, C)
    output, whose channels are last."""
    if feature.dim() == 3:
        feature = feature.transpose(1, 2)
    return F.normalize(feature.float().abs().pow(p).mean(1).flatten(1), dim=1)


class Features:
    """Forward hooks keeping the latest output of each named module."""

    def __init__(self, model: nn.Module, layers: list[str]):
        modules = dict(model.named_modules())
        missing = [name for name in layers if name not in modules]
        if missing:
            raise MapPruneError(f"the model has no module {', '.join(missing)}; NAD layers must be module names "
                                f"such as {', '.join(stage_outputs(model))}")
        self.out: dict[str, torch.Tensor] = {}
        self.handles = [modules[name].register_forward_hook(self._keep(name)) for name in layers]

    def _keep(self, name):
        def hook(module, inputs, output):
            self.out[name] = output
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


class NAD(Defense):
    name = "nad"

    def __init__(self, *, teacher_epochs: int = 10, epochs: int = 10, lr: float = 0.01, batch_size: int = 256,
                 weight_decay: float = 5e-4, betas: tuple = (500.0, 1000.0, 1000.0), power: float = 2.0,
                 layers: tuple | None = None, **kw):
        super().__init__(**kw)
        if teacher_epochs < 1 or epochs < 1 or batch_size < 1 or lr <= 0 or weight_decay < 0:
            raise MapPruneError("NAD needs teacher_epochs, epochs, batch_size >= 1, lr > 0, weight_decay >= 0; got "
                                f"{teacher_epochs}, {epochs}, {batch_size}, {lr}, {weight_decay}")
        betas = [float(b) for b in betas]  # a list: what result.json reads back
        if not betas or min(betas) < 0 or power <= 0:
            raise MapPruneError(f"betas must be >= 0 (one per layer) and power > 0, got {betas}, {power}")
        if layers is not None and len(layers) != len(betas):
            raise MapPruneError(f"{len(layers)} layers but {len(betas)} betas; give one beta per layer")
        self.teacher_epochs, self.epochs, self.lr, self.batch_size = teacher_epochs, epochs, lr, batch_size
        self.weight_decay, self.betas, self.power = weight_decay, betas, power
        self.layers = None if layers is None else list(layers)

    def _config(self, epochs: int) -> TrainConfig:
        return TrainConfig(epochs=epochs, batch_size=self.batch_size, lr=self.lr, momentum=0.9,
                           weight_decay=self.weight_decay, schedule="constant", hflip=self.hflip, seed=self.seed)

    def _repair(self, model, data: CleanData, device):
        layers = list(self.layers or stage_outputs(model, len(self.betas)))
        # A model with fewer stages than betas distils the stages it has, with the betas of the highest layers.
        betas = dict(zip(layers, self.betas[len(self.betas) - len(layers):]))
        t0 = time.perf_counter()
        teacher = copy.deepcopy(model)
        teacher_history = train(teacher, data.x, data.y, self._config(self.teacher_epochs), device=device,
                                progress=self.progress, desc="nad teacher")
        timings = {"teacher": time.perf_counter() - t0}
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        student_f, teacher_f = Features(model, layers), Features(teacher, layers)

        def loss_fn(out, xb, yb):
            with torch.no_grad():
                teacher(xb)
            at = sum(b * (attention(student_f.out[k], self.power) - attention(teacher_f.out[k], self.power))
                     .pow(2).mean() for k, b in betas.items())
            return F.cross_entropy(out, yb) + at

        t0 = time.perf_counter()
        try:
            history = train(model, data.x, data.y, self._config(self.epochs), device=device, loss_fn=loss_fn,
                            progress=self.progress, desc="nad student")
        finally:
            student_f.remove()
            teacher_f.remove()
        timings["student"] = time.perf_counter() - t0
        return self.result(model, timings, history=history,
                           extra={"layers": betas, "teacher_history": teacher_history})
