"""Shared plumbing for attacks whose trigger is a small network trained in :meth:`Attack.prepare`
(SSBA's steganographic encoder, Input-aware's generators): prefixed state dicts, a step loop with an optional
progress bar, and a clear error when the trigger is used before it exists.
"""

import sys
from contextlib import contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm

from ..checkpoint import load_state_into
from ..errors import MapPruneError


def prefixed(prefix: str, module: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v.detach().cpu() for k, v in module.state_dict().items()}


def load_prefixed(module: nn.Module, tensors: dict[str, torch.Tensor], prefix: str, what: str) -> None:
    """Loads the ``prefix.*`` tensors into ``module`` strictly; a mismatch is one MapPruneError."""
    part = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
    if not part:
        raise MapPruneError(f"the saved {what} state holds no '{prefix}.*' tensors; the attack file is incomplete")
    load_state_into(module, part, f"the {what} state", what=what)


def frozen(module: nn.Module) -> nn.Module:
    """Eval mode, CPU, no gradients: the trigger network after training, deterministic for every call."""
    module = module.cpu().eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def check_dataset(name: str, image_shape, dataset) -> None:
    if tuple(dataset.image_shape) != tuple(image_shape):
        raise MapPruneError(f"{name} was created for images of shape {tuple(image_shape)} but the dataset "
                            f"{dataset.name!r} has {tuple(dataset.image_shape)}")
    if len(dataset.x_train) < 2:
        raise MapPruneError(f"{name} trains its trigger network on the training images and needs at least 2")


def not_prepared(name: str) -> MapPruneError:
    return MapPruneError(f"the {name} trigger network does not exist yet: call prepare(dataset) first (the attack "
                         "job does) or load_state() from a saved run")


@contextmanager
def seeded(seed: int):
    """Seeds weight initialisation without disturbing the caller's global random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def progress_bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    return tqdm(total=total, desc=desc, unit="step", leave=False, dynamic_ncols=True,
                mininterval=0.1 if sys.stderr.isatty() else 30)


def batch(x: torch.Tensor, n: int, g: torch.Generator, device) -> torch.Tensor:
    """A random batch of uint8 images as floats in [0, 1] on ``device``."""
    idx = torch.randint(0, len(x), (n,), generator=g)
    return x[idx].to(device).float().div_(255)
