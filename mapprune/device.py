"""Device and precision choices, in one place: CUDA when present, bf16 autocast where the CPU supports it."""

import contextlib

import torch

from .errors import MapPruneError


def pick_device(name: str | None = None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise MapPruneError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MapPruneError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    return dev


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype worth using on this device, or None for plain float32."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    try:
        if torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return torch.bfloat16
    except (AttributeError, RuntimeError):
        pass
    return None


def autocast(device: torch.device, enabled: bool = True):
    dtype = amp_dtype(device) if enabled else None
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak on GPU, max resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource  # lazy: a Unix-only module, and importing mapprune.device must work everywhere

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
