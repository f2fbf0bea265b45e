"""The defense protocol: ``repair(model, images, labels) -> DefenseResult``, plus the shared fine-tune.

Every defense gets the backdoored model and the same clean, class-balanced subset of the training set; none
sees the test set. Fine-tuning always goes through the project's one training loop.
"""

import copy
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ..device import peak_memory_mb, pick_device
from ..errors import MapPruneError
from ..train import TrainConfig, train


@dataclass
class DefenseResult:
    """What a defense returns: the repaired model and everything it measured on the way."""

    model: nn.Module
    defense: str
    params: dict
    timings: dict = field(default_factory=dict)  # seconds per phase
    peak_memory_mb: float = 0.0
    pruned: dict[str, list[int]] = field(default_factory=dict)
    scores: dict[str, torch.Tensor] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    original: nn.Module | None = None  # the model as tested (FMT keeps it for figures), not serialised

    @property
    def num_pruned(self) -> int:
        return sum(len(v) for v in self.pruned.values())

    def to_json(self) -> dict:
        return {
            "defense": self.defense,
            "params": self.params,
            "timings": self.timings,
            "peak_memory_mb": self.peak_memory_mb,
            "num_pruned": self.num_pruned,
            "pruned": self.pruned,
            "scores": {k: [round(float(s), 6) for s in v] for k, v in self.scores.items()},
            "history": self.history,
        }


def as_uint8_images(images) -> torch.Tensor:
    """Accepts uint8 tensors/arrays (N, C, H, W) or floats in [0, 1]; returns uint8 (N, C, H, W)."""
    x = torch.as_tensor(images)
    if x.ndim != 4:
        raise MapPruneError(f"clean images must be (N, C, H, W), got shape {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        return x
    if not torch.is_floating_point(x) or x.min() < 0 or x.max() > 1:
        raise MapPruneError("clean images must be uint8 in [0, 255] or floats in [0, 1] (not normalised)")
    return x.mul(255).round_().to(torch.uint8)


class Defense:
    """Base class: subclasses set ``name`` and implement :meth:`_repair` on a private copy of the model."""

    name = "defense"

    def __init__(self, *, epochs: int = 10, lr: float = 0.01, batch_size: int = 256, weight_decay: float = 0.0,
                 min_lr: float = 1e-4, hflip: bool = True, seed: int = 0, device=None, progress: bool = False):
        self.epochs, self.lr, self.batch_size = epochs, lr, batch_size
        self.weight_decay, self.min_lr, self.hflip = weight_decay, min_lr, hflip
        self.seed, self.device, self.progress = seed, device, progress

    def params(self) -> dict:
        return {k: v for k, v in vars(self).items() if k not in ("device", "progress")}

    def finetune_config(self) -> TrainConfig:
        """FMT's fine-tune (and FT's): SGD lr 0.01, momentum 0.9, no weight decay, cosine to 1e-4, batch 256."""
        return TrainConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, momentum=0.9,
                           weight_decay=self.weight_decay, schedule="cosine", min_lr=self.min_lr,
                           hflip=self.hflip, seed=self.seed)

    def finetune(self, model, x, y, after_step=None, device=None) -> list[dict]:
        if self.epochs == 0:
            return []
        return train(model, x, y, self.finetune_config(), device=device, after_step=after_step,
                     progress=self.progress, desc=f"{self.name} fine-tune")

    def repair(self, model: nn.Module, images, labels) -> DefenseResult:
        """Repairs a copy of ``model`` (the original is untouched) with clean ``images`` and ``labels``."""
        x = as_uint8_images(images)
        y = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        if len(x) != len(y) or len(x) == 0:
            raise MapPruneError(f"need as many labels as clean images (got {len(x)} images, {len(y)} labels)")
        device = pick_device(self.device)
        model = copy.deepcopy(model).to(device).eval()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        result = self._repair(model, x, y, device)
        result.timings["total"] = time.perf_counter() - t0
        result.peak_memory_mb = peak_memory_mb(device)
        result.model = result.model.eval()
        return result

    def _repair(self, model, x, y, device) -> DefenseResult:
        raise NotImplementedError
