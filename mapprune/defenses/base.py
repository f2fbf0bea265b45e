"""The defense protocol: ``repair(model, images, labels) -> DefenseResult``, plus the shared fine-tune.

Every defense gets the backdoored model and the same clean, class-balanced subset of the training set; none
sees the test set. Fine-tuning always goes through the project's one training loop.
"""

import copy
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
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
    extra: dict = field(default_factory=dict)  # method-specific results (FMT: suspected target, suspicions)
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
            **self.extra,
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


# The fine-tunes every fine-tuning defense can use (FMT and FT share them, so pruning's own effect stays visible).
# ``paper``: FMT's published fine-tune (SGD lr 0.01, cosine to 1e-4, 10 epochs, batch 256, no weight decay).
# ``recommended``: a fine-tune matched to a short one-cycle training recipe (the CPU preset trains at peak lr
# 0.1): one-cycle to 0.02, nesterov, weight decay 5e-4, batch 128, 15 epochs. Chosen on measurements in
# docs/results.md ("A stronger FMT"); at the paper's lr a width-16 model stays in its backdoored basin.
FINETUNES: dict[str, dict] = {
    "paper": {"epochs": 10, "lr": 0.01, "batch_size": 256, "weight_decay": 0.0, "min_lr": 1e-4,
              "schedule": "cosine", "nesterov": False, "distill": 0.0},
    "recommended": {"epochs": 15, "lr": 0.02, "batch_size": 128, "weight_decay": 5e-4, "min_lr": 0.0,
                    "schedule": "onecycle", "nesterov": True, "distill": 1.0},
}
RECIPES = tuple(FINETUNES)


class Defense:
    """Base class: subclasses set ``name`` and implement :meth:`_repair` on a private copy of the model.

    ``recipe`` picks the defaults of every hyperparameter left as None (``recommended`` or ``paper``); an explicit
    value always wins and is recorded as given.
    """

    name = "defense"

    def __init__(self, *, recipe: str = "recommended", epochs: int | None = None, lr: float | None = None,
                 batch_size: int | None = None, weight_decay: float | None = None, min_lr: float | None = None,
                 schedule: str | None = None, nesterov: bool | None = None, distill: float | None = None,
                 hflip: bool = True, seed: int = 0, device=None, progress: bool = False):
        if recipe not in FINETUNES:
            raise MapPruneError(f"unknown recipe {recipe!r}; valid: {', '.join(RECIPES)}")
        self.recipe = recipe
        given = {"epochs": epochs, "lr": lr, "batch_size": batch_size, "weight_decay": weight_decay,
                 "min_lr": min_lr, "schedule": schedule, "nesterov": nesterov, "distill": distill}
        for k, v in given.items():
            setattr(self, k, FINETUNES[recipe][k] if v is None else v)
        self.hflip, self.seed, self.device, self.progress = hflip, seed, device, progress
        # Fails here, before any work, rather than after the testing phase.
        if self.epochs > 0:
            self.finetune_config().validate()
        elif self.epochs < 0:
            raise MapPruneError(f"epochs must be >= 0, got {self.epochs}")
        if self.distill < 0:
            raise MapPruneError(f"distill must be >= 0, got {self.distill}")

    def params(self) -> dict:
        return {k: v for k, v in vars(self).items() if k not in ("device", "progress")}

    def finetune_config(self) -> TrainConfig:
        """The fine-tune of FMT and FT: SGD with momentum 0.9 and the recipe's schedule (see ``FINETUNES``)."""
        return TrainConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, momentum=0.9,
                           weight_decay=self.weight_decay, schedule=self.schedule, min_lr=self.min_lr,
                           nesterov=self.nesterov, hflip=self.hflip, seed=self.seed)

    def finetune(self, model, x, y, after_step=None, device=None, teacher: nn.Module | None = None) -> list[dict]:
        """The shared fine-tune. With ``distill`` > 0 and a ``teacher`` (the model as it came in), the loss adds
        ``distill`` x the KL divergence to the teacher's softened predictions (temperature 4) on the same clean
        batch: the teacher's knowledge of clean images, which 10% of the data alone cannot rebuild."""
        if self.epochs == 0:
            return []
        loss_fn = None
        if self.distill > 0 and teacher is not None:
            teacher = teacher.eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
            w, t = self.distill, 4.0

            def loss_fn(out, xb, yb):
                with torch.no_grad():
                    soft = F.softmax(teacher(xb).float() / t, 1)
                kd = F.kl_div(F.log_softmax(out.float() / t, 1), soft, reduction="batchmean") * t * t
                return F.cross_entropy(out, yb) + w * kd
        return train(model, x, y, self.finetune_config(), device=device, after_step=after_step, loss_fn=loss_fn,
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
