"""Clean models of a dataset, trained once with the project's one loop and kept in the resource cache: the
surrogate that Low Frequency and Label-consistent attacks are built from."""

from dataclasses import asdict

import torch
from torch import nn

from .checkpoint import load_state_into
from .errors import MapPruneError
from .models import create_model
from .presets import PRESETS
from .resources import BUILDERS_VERSION, cached_resource, resource_path
from .train import TrainConfig, train


def _clean_train_config(dataset, model: str, epochs: int | None, seed: int):
    # The small CNN gets the digits demo schedule; every other architecture the CPU preset (one-cycle to lr
    # 0.1, 20 epochs), which trains a usable clean CIFAR model in a CPU budget. Only the epochs are exposed.
    preset = dict(PRESETS["demo" if model == "smallcnn" else "cpu"])
    preset.pop("model")
    preset.pop("width")
    if epochs is not None:
        if epochs < 1:
            raise MapPruneError(f"clean-model epochs must be a positive integer, got {epochs}")
        preset["epochs"] = epochs
    return TrainConfig(seed=seed, hflip=dataset.hflip, **preset)


def clean_model_key(dataset, *, model: str = "preactresnet18", width: int = 16, epochs: int | None = None,
                    seed: int = 0) -> dict:
    """The full cache key of :func:`clean_model`; attacks nest it in the keys of what they derive from it."""
    cfg = _clean_train_config(dataset, model, epochs, seed)
    return {"v": BUILDERS_VERSION, "dataset": dataset.fingerprint(), "num_classes": dataset.num_classes,
            "image_shape": list(dataset.image_shape), "mean": list(dataset.mean), "std": list(dataset.std),
            "model": model, "width": width, "train": asdict(cfg)}


def clean_model(dataset, *, model: str = "preactresnet18", width: int = 16, epochs: int | None = None, seed: int = 0,
                device=None, progress: bool = True) -> nn.Module:
    """A model trained on the clean training set with the project's one loop, cached by :func:`clean_model_key`.

    Returned in eval mode on ``device`` (default CPU). ``epochs`` None uses the preset's (20, or 12 for the
    small CNN).
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    key = clean_model_key(dataset, model=model, width=width, epochs=epochs, seed=seed)
    cfg = _clean_train_config(dataset, model, epochs, seed)

    def new_model():
        return create_model(model, dataset.num_classes, width=width, in_channels=dataset.image_shape[0],
                            mean=dataset.mean, std=dataset.std)

    def build():
        torch.manual_seed(seed)  # the same initial weights as an attack run with this seed
        net = new_model()
        train(net, dataset.x_train, dataset.y_train, cfg, device=device, progress=progress,
              desc=f"clean {model} {dataset.name}")
        return {k: v.detach().cpu() for k, v in net.state_dict().items()}

    tensors, _ = cached_resource("clean_model", key, build)
    net = new_model()
    load_state_into(net, tensors, resource_path("clean_model", key), what=f"clean {model}")
    return net.to(device).eval()
