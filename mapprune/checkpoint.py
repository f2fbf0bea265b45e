"""Weights on disk: safetensors only (never pickle), written atomically, loaded with clear errors."""

import errno
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import MapPruneError


def atomic_save(tensors: dict[str, torch.Tensor], path: Path, meta: dict | None = None) -> None:
    """Writes ``tensors`` to a temporary file beside ``path`` and renames it into place, so ``path`` is either the
    old file or the complete new one. A failed write removes the temporary file; a full disk is a
    :class:`MapPruneError` saying so (safetensors reports it as a SafetensorError, not an OSError), any other
    failure an OSError naming ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    try:
        save_file(tensors, str(tmp), metadata={"mapprune": json.dumps(meta or {})})
        os.replace(tmp, path)
    except (SafetensorError, OSError) as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if _disk_full(e):
            raise MapPruneError(f"could not write {path}: no space left on device ({detail}); free space and rerun "
                                "the same command: it resumes") from None
        if isinstance(e, OSError):
            raise
        raise OSError(f"could not write {path}: {detail}") from None


def _disk_full(e: Exception) -> bool:
    """Whether a write failed for want of space: ENOSPC (or EDQUOT, a full quota) as an OSError, or in the text of
    safetensors' error (its Rust I/O error: "No space left on device (os error 28)")."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e)
    return any(s in text for s in (os.strerror(errno.ENOSPC), os.strerror(errno.EDQUOT), "StorageFull",
                                   "QuotaExceeded", f"os error {errno.ENOSPC}", f"code: {errno.ENOSPC},"))


def load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Reads a safetensors file and its mapprune metadata; a broken file gives one clear error."""
    path = Path(path)
    if not path.is_file():
        raise MapPruneError(f"checkpoint {path} does not exist")
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {}).get("mapprune", "{}"))
        if not isinstance(meta, dict):
            raise ValueError(f"its mapprune metadata is a {type(meta).__name__}, not an object")
    except (SafetensorError, OSError, ValueError, json.JSONDecodeError) as e:
        raise MapPruneError(
            f"checkpoint {path} is corrupted or truncated ({e}); re-create it or restore it from a copy"
        ) from None
    return tensors, meta


def save_model(model: nn.Module, path: Path, meta: dict | None = None) -> None:
    atomic_save(model.state_dict(), path, meta)


def load_state_into(model: nn.Module, state: dict[str, torch.Tensor], path, what: str = "model") -> None:
    """Loads a state dict strictly; any key or shape mismatch becomes one sentence naming the difference."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    shapes = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or extra or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing tensors (e.g. {missing[0]})")
        if extra:
            parts.append(f"{len(extra)} unexpected tensors (e.g. {extra[0]})")
        if shapes:
            k = shapes[0]
            parts.append(f"{len(shapes)} shape mismatches (e.g. {k}: file {tuple(state[k].shape)} vs "
                         f"{what} {tuple(own[k].shape)})")
        raise MapPruneError(
            f"checkpoint {path} does not fit the {what}: {'; '.join(parts)}. "
            "Was it saved from another architecture, width or class count?"
        )
    for k, v in state.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            bad = int((~torch.isfinite(v)).sum())
            raise MapPruneError(
                f"checkpoint {path} holds non-finite values: {bad} of {v.numel()} entries of {k} are NaN or infinite; "
                "a model with broken weights cannot be measured or judged: retrain it or restore a good copy"
            )
    model.load_state_dict(state)
