"""The attack protocol. An attack is one small class: a trigger on float pixels, the label rule, and how
training images are chosen for poisoning. The same ``trigger`` poisons training data and builds the backdoor
test set, so train-time and test-time triggers cannot drift apart.
"""

from typing import ClassVar

import torch

from ..errors import MapPruneError
from ..options import keyword_options

# Options every attack takes, which :meth:`Attack.config` records itself.
COMMON = ("target", "all_to_all", "poison_ratio", "clean_label")


class Attack:
    """Base class. Subclasses set ``name`` and implement :meth:`trigger`."""

    name: ClassVar[str] = "attack"
    clean_label: ClassVar[bool] = False  # True: poison only target-class images and keep their labels

    def __init__(self, image_shape, num_classes: int, *, target: int = 0, all_to_all: bool = False,
                 poison_ratio: float = 0.1):
        if not 0 <= poison_ratio <= 1:
            raise MapPruneError(f"poison ratio must be in [0, 1], got {poison_ratio}")
        if not 0 <= target < num_classes:
            raise MapPruneError(f"target label must be in [0, {num_classes - 1}], got {target}")
        if all_to_all and self.clean_label:
            raise MapPruneError(f"{self.name} is a clean-label attack and has no all-to-all variant")
        self.image_shape = tuple(image_shape)
        self.num_classes = num_classes
        self.target = target
        self.all_to_all = all_to_all
        self.poison_ratio = poison_ratio

    # -- what a subclass defines ---------------------------------------------------------------------
    def trigger(self, x: torch.Tensor) -> torch.Tensor:
        """Applies the trigger to float images (N, C, H, W) in [0, 1]; returns new images in [0, 1]."""
        raise NotImplementedError

    @classmethod
    def option_names(cls) -> list[str]:
        """The attack's own options: the keyword-only arguments of its ``__init__`` chain (the subclass's first),
        less the common ones in ``COMMON``."""
        return keyword_options(cls, Attack, COMMON)

    def params(self) -> dict:
        """The attack's own hyperparameters, recorded in the run manifest: each of :meth:`option_names` read back
        from the attribute of the same name (options kept under no such attribute are left out). An attack that
        records something else, or keeps an option under another name, overrides this."""
        return {k: getattr(self, k) for k in self.option_names() if hasattr(self, k)}

    def state(self) -> dict[str, torch.Tensor]:
        """Tensors needed to re-create the trigger (patterns, fields); saved beside the model."""
        return {}

    state_names: ClassVar[tuple[str, ...]] = ()  # the tensors :meth:`state` saves; the only ones loaded back

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restores the tensors :meth:`state` saved. Only names in ``state_names`` are accepted: a file never sets
        arbitrary attributes."""
        unknown = sorted(set(tensors) - set(self.state_names))
        if unknown:
            raise MapPruneError(f"the saved {self.name} attack state has unexpected entries {unknown}; it takes "
                                f"only {list(self.state_names) or 'none'} (a file from another attack or version?)")
        for k, v in tensors.items():
            if not isinstance(v, torch.Tensor):
                raise MapPruneError(f"the saved {self.name} attack state {k!r} is not a tensor")
            setattr(self, k, v)

    def prepare(self, dataset, *, device=None, progress: bool = True) -> None:
        """Builds what the trigger needs from the training data before poisoning (a clean model, an encoder,
        a perturbation), using the resource cache. Called once by the attack job; a no-op for fixed triggers.
        After it, :meth:`state` must hold everything needed to re-create the trigger without the data.
        """

    def prepare_poison(self, x: torch.Tensor, y: torch.Tensor, seed: int) -> None:
        """Builds and caches what poisoning the images chosen by ``seed`` needs beyond :meth:`prepare` (LC's PGD
        images), so ``mapprune prepare`` can make it ahead; a no-op where poisoning needs nothing more.
        """

    def training_loss(self, model):
        """A loss ``(logits, images, labels) -> loss`` to train the backdoored model with instead of the
        cross-entropy (adaptive attacks add a regulariser); None: the plain cross-entropy."""
        return None

    # -- shared machinery ----------------------------------------------------------------------------
    def config(self) -> dict:
        return {"name": self.name, "target": self.target, "all_to_all": self.all_to_all,
                "poison_ratio": self.poison_ratio, "clean_label": self.clean_label, **self.params()}

    def target_labels(self, y: torch.Tensor) -> torch.Tensor:
        if self.all_to_all:
            return (y + 1) % self.num_classes
        return torch.full_like(y, self.target)

    def apply(self, x: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        """Triggers uint8 images (N, C, H, W) and returns uint8 images, quantised like a saved image."""
        out = torch.empty_like(x)
        for i in range(0, len(x), chunk):
            xf = x[i:i + chunk].float().div_(255)
            out[i:i + chunk] = self.trigger(xf).clamp_(0, 1).mul_(255).round_().to(torch.uint8)
        return out

    def poison_indices(self, y: torch.Tensor, seed: int) -> torch.Tensor:
        """Seeded choice of round(ratio * N) training images to poison (sorted).

        Dirty-label all-to-one attacks draw from non-target images (a poisoned target image teaches nothing);
        clean-label attacks draw from target images only.
        """
        if self.clean_label:
            candidates = torch.nonzero(y == self.target).flatten()
        elif self.all_to_all:
            candidates = torch.arange(len(y))
        else:
            candidates = torch.nonzero(y != self.target).flatten()
        count = min(round(self.poison_ratio * len(y)), len(candidates))
        g = torch.Generator().manual_seed(seed)
        return candidates[torch.randperm(len(candidates), generator=g)[:count]].sort().values

    def poison_train(self, x: torch.Tensor, y: torch.Tensor, seed: int):
        """Returns (poisoned images, poisoned labels, poison indices); inputs are left untouched."""
        idx = self.poison_indices(y, seed)
        x, y = x.clone(), y.clone()
        if len(idx):
            x[idx] = self.apply(x[idx])
            if not self.clean_label:
                y[idx] = self.target_labels(y[idx])
        return x, y, idx

    def test_sets(self, x: torch.Tensor, y: torch.Tensor) -> dict:
        """What ``metrics.evaluate`` takes: the clean test set and the backdoor test set (an attack with several
        triggers adds each trigger's own under ``"triggers"``)."""
        return {"clean": (x, y), "backdoor": self.backdoor_test(x, y)}

    def backdoor_sources(self, y: torch.Tensor) -> torch.Tensor:
        """Indices of the images (labels ``y``) the backdoor is meant to send to the target: every image for
        all-to-all, the non-target ones otherwise (an attack with source classes narrows this)."""
        return torch.arange(len(y)) if self.all_to_all else torch.nonzero(y != self.target).flatten()

    def backdoor_test(self, x: torch.Tensor, y: torch.Tensor):
        """The backdoor test set: triggered test images, their attack targets and their true labels.

        All-to-one leaves out images of the target class (docs/protocol.md).
        """
        keep = self.backdoor_sources(y)
        return self.apply(x[keep]), self.target_labels(y[keep]), y[keep]
