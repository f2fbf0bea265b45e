"""A cache for what attacks build on demand: clean models, universal perturbations, adversarial images.

A leaf module: it imports nothing of mapprune's but the checkpoint format and the errors.

A resource is a dict of tensors stored as ``cache_dir()/resources/<kind>-<hash>.safetensors``, where the hash
is the first 16 hex digits of the SHA-256 of the JSON of its key. The key must name everything the resource
depends on (dataset fingerprint, architecture, width, training settings, seed, budget, ...): two calls with
equal keys share one file, and changing any input gives another file instead of a stale result.
"""

import hashlib
import json
import os
import re
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
from filelock import FileLock

from .checkpoint import atomic_save, load_tensors
from .errors import MapPruneError, MapPruneWarning

# Bump when a builder changes what it produces for the same key, so old files are not reused.
BUILDERS_VERSION = 1
_KIND = re.compile(r"^[a-z0-9][a-z0-9_]*$")


def cache_dir() -> Path:
    """Where decoded arrays and built resources are cached: $MAPPRUNE_CACHE or ~/.cache/mapprune."""
    return Path(os.environ.get("MAPPRUNE_CACHE", Path.home() / ".cache" / "mapprune"))


def key_hash(key: dict) -> str:
    """16 hex digits of the SHA-256 of the key's canonical JSON (sorted keys, no spaces)."""
    try:
        text = json.dumps(key, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise MapPruneError(f"resource key {key!r} is not plain JSON ({e}); use str, int, float, bool, lists "
                            "and dicts in resource keys") from None
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def resource_path(kind: str, key: dict) -> Path:

    if not _KIND.match(kind):
        raise MapPruneError(f"resource kind {kind!r} is not a valid name; use lower-case letters, digits and _")
    return cache_dir() / "resources" / f"{kind}-{key_hash(key)}.safetensors"


def cached_resource(kind: str, key: dict, build: Callable[[], dict[str, torch.Tensor]]
                    ) -> tuple[dict[str, torch.Tensor], str]:
    """Returns ``(tensors, key_hash)``: loaded from the cache, else made by ``build()`` and stored.

    A cached file whose recorded key differs from ``key`` (a hash collision) or that cannot be read is rebuilt.
    """
    path = resource_path(kind, key)
    # One builder at a time per resource: two bench workers needing the same clean model build it once.
    with _build_lock(path):
        return _cached_resource(kind, key, build, path)


@contextmanager
def _build_lock(path: Path):
    """Waits for any other process building the same resource (filelock's OS lock: released if that process
    dies). An unwritable cache builds without the lock."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(path.with_name(path.name + ".lock")))
        lock.acquire()
    except OSError:
        yield
        return
    try:
        yield
    finally:
        lock.release()


def _cached_resource(kind, key, build, path):
    h = key_hash(key)
    plain_key = json.loads(json.dumps(key))  # what the metadata round trip gives back (tuples become lists)
    if path.is_file():
        try:
            tensors, meta = load_tensors(path)
            if meta.get("kind") == kind and meta.get("key") == plain_key:
                return tensors, h
        except MapPruneError as e:
            warnings.warn(f"rebuilding the cached {kind} ({e})", MapPruneWarning, stacklevel=2)
    tensors = build()
    if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise MapPruneError(f"the builder of resource {kind!r} must return a dict of tensors")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save(tensors, path, {"kind": kind, "key": plain_key})
    except (OSError, MapPruneError) as e:  # the cache saves time only: a read-only or full cache must not stop the attack
        warnings.warn(f"cannot write the resource cache {path} ({e}); set MAPPRUNE_CACHE to a writable folder "
                      "to reuse it", MapPruneWarning, stacklevel=2)
    return {k: v.detach().cpu() for k, v in tensors.items()}, h
