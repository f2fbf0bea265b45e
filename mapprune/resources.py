"""A cache for what attacks build on demand: clean models, universal perturbations, adversarial images.

A resource is a dict of tensors stored as ``cache_dir()/resources/<kind>-<hash>.safetensors``, where the hash
is the first 16 hex digits of the SHA-256 of the JSON of its key. The key must name everything the resource
depends on (dataset fingerprint, architecture, width, training settings, seed, budget, ...): two calls with
equal keys share one file, and changing any input gives another file instead of a stale result.
"""

import hashlib
import json
import re
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from .checkpoint import atomic_save, load_state_into, load_tensors
from .errors import MapPruneError

# Bump when a builder changes what it produces for the same key, so old files are not reused.
BUILDERS_VERSION = 1
_KIND = re.compile(r"^[a-z0-9][a-z0-9_]*$")


def key_hash(key: dict) -> str:
    """16 hex digits of the SHA-256 of the key's canonical JSON (sorted keys, no spaces)."""
    try:
        text = json.dumps(key, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise MapPruneError(f"resource key {key!r} is not plain JSON ({e}); use str, int, float, bool, lists "
                            "and dicts in resource keys") from None
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def resource_path(kind: str, key: dict) -> Path:
    from .data import cache_dir

    if not _KIND.match(kind):
        raise MapPruneError(f"resource kind {kind!r} is not a valid name; use lower-case letters, digits and _")
    return cache_dir() / "resources" / f"{kind}-{key_hash(key)}.safetensors"


def cached_resource(kind: str, key: dict, build: Callable[[], dict[str, torch.Tensor]]
                    ) -> tuple[dict[str, torch.Tensor], str]:
    """Returns ``(tensors, key_hash)``: loaded from the cache, else made by ``build()`` and stored.

    A cached file whose recorded key differs from ``key`` (a hash collision) or that cannot be read is rebuilt.
    """
    path = resource_path(kind, key)
    h = key_hash(key)
    plain_key = json.loads(json.dumps(key))  # what the metadata round trip gives back (tuples become lists)
    if path.is_file():
        try:
            tensors, meta = load_tensors(path)
            if meta.get("kind") == kind and meta.get("key") == plain_key:
                return tensors, h
        except MapPruneError as e:
            print(f"warning: rebuilding the cached {kind} ({e})", file=sys.stderr)
    tensors = build()
    if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise MapPruneError(f"the builder of resource {kind!r} must return a dict of tensors")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save(tensors, path, {"kind": kind, "key": plain_key})
    except OSError as e:  # the cache saves time only: a read-only cache folder must not stop the attack
        print(f"warning: cannot write the resource cache {path} ({e}); set MAPPRUNE_CACHE to a writable folder "
              "to reuse it", file=sys.stderr)
    return {k: v.detach().cpu() for k, v in tensors.items()}, h


# -- clean models ------------------------------------------------------------------------------------------

def _clean_train_config(dataset, model: str, epochs: int | None, seed: int):
    from .presets import PRESETS
    from .train import TrainConfig

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
    from .models import create_model
    from .train import train

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


# -- building an attack's resources ahead of time (``mapprune prepare``) ----------------------------------

def prepare_attack(attack: str, dataset: str = "cifar10", data_dir=None, *, model: str | None = None,
                   width: int | None = None, epochs: int | None = None, target: int = 0, poison_ratio: float = 0.1,
                   seed: int = 0, device=None, progress: bool = True) -> dict:
    """Builds and caches what ``mapprune attack`` will need: ``create_attack(...).prepare(dataset)`` (clean model,
    perturbation, encoder, generators), then ``prepare_poison`` for what depends on the poisoned images themselves
    (LC's PGD images); returns the attack's config (with the resource hashes).

    ``model``, ``width`` and ``epochs`` set the clean (surrogate) model of the attacks built from one, and
    ``target``, ``poison_ratio`` and ``seed`` choose the poisoned images; they must match what the attack run will
    use (the defaults do), or the run builds its own.
    """
    from .attacks import ATTACKS, create_attack
    from .attacks.surrogate import SurrogateAttack
    from .data import load_dataset
    from .device import pick_device
    from .errors import unknown_name

    if attack not in ATTACKS:
        raise unknown_name("attack", attack, ATTACKS)
    kw = {k: v for k, v in (("surrogate", model), ("surrogate_width", width), ("surrogate_epochs", epochs))
          if v is not None}
    if kw and not issubclass(ATTACKS[attack], SurrogateAttack):
        users = sorted(n for n, c in ATTACKS.items() if issubclass(c, SurrogateAttack))
        raise MapPruneError(f"--model, --width and --epochs set the clean model of {', '.join(users)}; "
                            f"{attack} has none, so leave them out")
    ds = load_dataset(dataset, data_dir)
    atk = create_attack(attack, ds.image_shape, ds.num_classes, target=target, poison_ratio=poison_ratio, **kw)
    atk.prepare(ds, device=pick_device(device), progress=progress)
    atk.prepare_poison(ds.x_train, ds.y_train, seed)
    return atk.config()
