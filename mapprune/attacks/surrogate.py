"""Shared base of attacks derived from a clean (surrogate) model: Low Frequency and Label-consistent.

The clean model comes from the resource cache (:func:`mapprune.clean_model.clean_model`); its settings are
constructor arguments, so they are recorded in the manifest and ``mapprune prepare`` can build it ahead.
"""

import torch

from ..clean_model import clean_model, clean_model_key
from ..errors import MapPruneError, unknown_name
from ..models import MODELS
from .base import Attack


class SurrogateAttack(Attack):
    """An attack that needs a clean model of the training data in :meth:`prepare`."""

    def __init__(self, image_shape, num_classes, *, surrogate: str = "preactresnet18", surrogate_width: int = 16,
                 surrogate_epochs: int | None = None, surrogate_seed: int = 0, **kw):
        super().__init__(image_shape, num_classes, **kw)
        if surrogate not in MODELS:
            raise unknown_name("model", surrogate, MODELS)
        if surrogate_width < 1 or (surrogate_epochs is not None and surrogate_epochs < 1):
            raise MapPruneError(f"surrogate width and epochs must be positive, got {surrogate_width} and "
                                f"{surrogate_epochs}")
        self.surrogate = surrogate
        self.surrogate_width = surrogate_width
        self.surrogate_epochs = surrogate_epochs
        self.surrogate_seed = surrogate_seed
        self._device = torch.device("cpu")

    def surrogate_params(self) -> dict:
        return {"surrogate": self.surrogate, "surrogate_width": self.surrogate_width,
                "surrogate_epochs": self.surrogate_epochs, "surrogate_seed": self.surrogate_seed}

    def surrogate_key(self, dataset) -> dict:
        return clean_model_key(dataset, model=self.surrogate, width=self.surrogate_width,
                               epochs=self.surrogate_epochs, seed=self.surrogate_seed)

    def surrogate_model(self, dataset, progress: bool = True):
        """The clean model, trained on first use and cached; frozen, in eval mode on the prepare device."""
        net = clean_model(dataset, model=self.surrogate, width=self.surrogate_width, epochs=self.surrogate_epochs,
                          seed=self.surrogate_seed, device=self._device, progress=progress)
        return net.requires_grad_(False)

    def check_dataset(self, dataset) -> None:
        if tuple(dataset.image_shape) != self.image_shape or dataset.num_classes != self.num_classes:
            raise MapPruneError(f"{self.name} was created for {self.num_classes} classes of {self.image_shape} images "
                                f"but prepare() got {dataset.name} ({dataset.num_classes} classes of "
                                f"{tuple(dataset.image_shape)}); create the attack with the dataset's shape")
