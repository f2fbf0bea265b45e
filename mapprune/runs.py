"""The run folder: manifest.json + model.safetensors + attack.safetensors (trigger state, poison indices)
+ samples.png, plus defense/<name>/ sub-folders.

Runs are built in ``<RUN>.partial`` and renamed into place only when complete, so an interrupted command never
leaves a folder that looks complete; rerunning the same command resumes from the partial folder's checkpoint.
"""

import json
import math
import os
import platform
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy
import torch
from filelock import FileLock, Timeout

from . import __version__
from .attacks import Attack, create_attack
from .checkpoint import load_state_into, load_tensors
from .data import ImageDataset, load_dataset
from .errors import MapPruneError, MapPruneWarning
from .migrate import upgrade_manifest, upgrade_result
from .models import create_model

MANIFEST = "manifest.json"


def versions() -> dict:
    # torch_threads: CPU results can differ in the last digits with the thread count (reductions split differently).
    return {"mapprune": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": numpy.__version__, "platform": platform.platform(), "torch_threads": torch.get_num_threads()}


def finite_json(obj):
    """``obj`` with every NaN or infinite float replaced by None, so it serialises as strict JSON (RFC 8259 has no
    NaN/Infinity tokens, and other tools' parsers refuse them)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite_json(v) for v in obj]
    return obj


def json_text(obj, indent: int | None = 2) -> str:
    """Strict JSON text of ``obj`` (non-finite floats written as null)."""
    return json.dumps(finite_json(obj), indent=indent, sort_keys=False, allow_nan=False)


def atomic_write_text(path: Path, text: str | bytes) -> None:
    """Writes ``text`` (str as UTF-8, or bytes) to ``path`` so that a reader, a crash or a full disk never leaves
    a partial file: a hidden temporary file in the same folder, flushed to disk, then renamed over ``path``. On
    failure the temporary file is removed and ``path`` keeps its previous content."""
    path = Path(path)
    data = text.encode() if isinstance(text, str) else text
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path, obj) -> None:
    atomic_write_text(path, json_text(obj) + "\n")


def dataset_record(ds, registry: str) -> dict:
    """What a manifest says of its dataset: the loader's summary, the folder the data came from (the loaders
    accept the dataset's own folder or file, so eval finds the data again without flags; none for the built-in
    digits) and the ``load_dataset`` name (an npz or ImageFolder dataset is named after its file)."""
    summary = ds.summary()
    summary["data_dir"] = None if registry == "digits" else str(Path(ds.source).resolve())
    summary["registry"] = registry
    return summary


def is_complete_run(path: Path, marker: str = MANIFEST) -> bool:
    return (Path(path) / marker).is_file()


def _holder_file(lock_path: Path) -> Path:
    return lock_path.with_name(lock_path.name + ".holder")


def acquire_folder_lock(folder: Path, what: str) -> FileLock:
    """Takes the write lock of ``folder`` (a hidden ``.<name>.lock`` beside it; an OS lock, so a killed process
    never leaves it held) or raises one line naming the process that holds it."""
    folder = Path(folder)
    lock_path = folder.with_name(f".{folder.name}.lock")
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(lock_path), timeout=0)
        lock.acquire()
    except Timeout:
        try:
            holder = json.loads(_holder_file(lock_path).read_text())
            by = f"pid {holder['pid']}, `{holder['command']}`, since {holder['since']}"
        except (OSError, ValueError, KeyError, TypeError):
            by = "another process"
        raise MapPruneError(f"{folder} is being written by another mapprune {what} ({by}); wait for it to finish, "
                            "or stop it and rerun") from None
    except OSError as e:
        raise MapPruneError(f"cannot lock {folder} for writing ({e}); check that its parent folder is writable") from None
    try:
        _holder_file(lock_path).write_text(json.dumps({"pid": os.getpid(), "command": " ".join(sys.argv),
                                                        "since": time.strftime("%Y-%m-%d %H:%M:%S")}))
    except OSError:
        pass  # the holder's name is a courtesy; the lock itself is held
    return lock


class RunWriter:
    """Builds a folder under a ``.partial`` name and moves it into place on :meth:`finish`. It holds the folder's
    write lock from creation to :meth:`finish` (or :meth:`close`), so a second writer of the same run or defense
    variant fails at once with one line naming the first, and two processes never mix one folder."""

    def __init__(self, out: Path, overwrite: bool = False, marker: str = MANIFEST):
        self.out = Path(out)
        self.lock = acquire_folder_lock(self.out, "command")
        try:
            self._check(overwrite, marker)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Releases the folder's lock (idempotent)."""
        if self.lock.is_locked:
            self.lock.release()

    def _check(self, overwrite: bool, marker: str) -> None:
        if self.out.exists() and not self.out.is_dir():
            raise MapPruneError(f"{self.out} exists and is not a folder; choose another --out")
        if self.out.is_dir() and any(self.out.iterdir()):
            if not is_complete_run(self.out, marker):
                # --overwrite replaces a run, never an arbitrary folder (it would be deleted on finish()).
                raise MapPruneError(f"{self.out} is not empty and holds no mapprune run; choose another --out")
            if not overwrite:
                raise MapPruneError(f"{self.out} already holds a run; pass --overwrite to replace it or choose "
                                    "another --out")
        self.partial = self.out.with_name(self.out.name + ".partial")
        try:
            self.partial.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise MapPruneError(f"cannot create the run folder {self.partial}: {e}") from None

    def path(self, name: str) -> Path:
        return self.partial / name

    def discard_if_empty(self) -> None:
        """Removes the ``.partial`` folder if nothing was written to it (a run that failed before training) and
        releases the lock."""
        try:
            self.partial.rmdir()
        except OSError:
            pass  # not empty (it holds a checkpoint to resume from) or already gone
        self.close()

    def finish(self) -> Path:
        old = None
        if self.out.exists():
            old = self.out.with_name(f"{self.out.name}.old{os.getpid()}")
            os.replace(self.out, old)
        os.replace(self.partial, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self.close()
        return self.out


# What the code reads from a run's manifest.json and a defense's result.json (once mapprune.migrate has brought
# them to the current format), key by key: a type, a tuple of types (any of them), a list holding one type (a list
# of those), or a dict (the keys inside it); a key ending in "?" may be absent. ``float`` stands for any number (an
# int too, never a bool), ``int`` for a whole number; a metric may be null (a NaN, written as strict JSON).
METRIC = (float, None)
MANIFEST_KEYS = {  # what every reader of a manifest uses (report, bench)
    "attack": {"name": str},
    "dataset": {"name": str},
    "metrics": {"acc": METRIC, "asr": METRIC, "ra": METRIC},
    "timings": {"train_s?": float, "train_epochs_s?": float, "total_s?": float},
}
RUN_KEYS = {  # what reloading the run's model, attack and data reads besides (load_run)
    "model": {"name": str, "num_classes": int, "width?": (int, None), "in_channels": int, "mean": [float],
              "std": [float]},
    "dataset": {"registry": str, "data_dir": (str, None), "num_classes": int, "image_shape": [int],
                "fingerprint": str},
}
MANIFEST_FIX = "restore it from a copy or re-create the run"
TARGET_KEYS = {"target": int, "anomaly_index": float}
RESULT_KEYS = {
    "name": str,
    "after": {"acc": METRIC, "asr": METRIC, "ra": METRIC},
    "der": METRIC,
    "num_pruned": int,
    "wall_s": float,
    "clean_subset": {"seed": (int, None)},
    "recipe?": (str, None),
    "params?": dict,
    "suspected_target?": TARGET_KEYS,
    "stimulated_target?": TARGET_KEYS,
}
_WORDS = {str: "a string", int: "a whole number", float: "a number", dict: "an object", list: "a list", None: "null"}


def _fits(value, want) -> bool:
    if isinstance(want, tuple):
        return any(_fits(value, w) for w in want)
    if isinstance(want, list):
        return isinstance(value, list) and all(_fits(v, want[0]) for v in value)
    if isinstance(want, dict):
        return isinstance(value, dict)
    if want is None:
        return value is None
    if want in (int, float) and isinstance(value, bool):
        return False
    return isinstance(value, int | float) if want is float else isinstance(value, want)


def _describe(want) -> str:
    if isinstance(want, tuple):
        return " or ".join(_describe(w) for w in want)
    if isinstance(want, list):
        return f"a list of {_describe(want[0]).split(' ', 1)[1]}s"
    return _WORDS[dict if isinstance(want, dict) else want]


def _kind(value) -> str:
    if isinstance(value, bool):
        return "a boolean"
    for t in (None, str, int, float, dict, list):
        if value is None if t is None else isinstance(value, t):
            return _WORDS[t]
    return f"a {type(value).__name__}"


def check_keys(obj: dict, keys: dict, path, fix: str, prefix: str = "") -> None:
    """Raises a :class:`MapPruneError` naming ``path`` and the first key of ``keys`` (see ``MANIFEST_KEYS``) that
    ``obj`` lacks or holds with another type; ``fix`` says what to do about it."""
    for key, want in keys.items():
        optional = key.endswith("?")
        key = key.rstrip("?")
        where = f"{prefix}{key}"
        if key not in obj:
            if optional:
                continue
            raise MapPruneError(f"{path} is damaged: it has no {where!r}; {fix}")
        value = obj[key]
        if not _fits(value, want):
            shown = json.dumps(value)
            shown = shown if len(shown) <= 40 else shown[:37] + "..."
            raise MapPruneError(f"{path} is damaged: {where!r} is {_kind(value)} ({shown}), not "
                                f"{_describe(want)}; {fix}")
        if isinstance(want, dict):
            check_keys(value, want, path, fix, f"{where}.")


def _read_json(path: Path, what: str, fix: str) -> dict:
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MapPruneError(f"{path} is not valid JSON ({e}); {fix}") from None
    if not isinstance(obj, dict):
        raise MapPruneError(f"{path} is damaged: it holds {_kind(obj)}, not the {what} object; {fix}")
    return obj


def read_manifest(run: Path) -> dict:
    """A run's manifest.json in the current format (:func:`mapprune.migrate.upgrade_manifest`), checked to hold the
    keys every reader uses (``MANIFEST_KEYS``) with their types."""
    run = Path(run)
    path = run / MANIFEST
    if not path.is_file():
        hint = " (an interrupted run: rerun the same command to resume it)" if run.with_name(run.name + ".partial").is_dir() else ""
        raise MapPruneError(f"{run} is not a mapprune run folder: {MANIFEST} is missing{hint}")
    m = upgrade_manifest(_read_json(path, "manifest", MANIFEST_FIX), path)
    check_keys(m, MANIFEST_KEYS, path, MANIFEST_FIX)
    return m


def read_result(folder: Path, keys: dict = RESULT_KEYS) -> dict:
    """A defense folder's result.json in the current format (:func:`mapprune.migrate.upgrade_result`), checked to
    hold ``keys`` with their types: by default every key the code reads (``RESULT_KEYS``); a reader that needs
    fewer names its own, so a file it can use is not refused for a key it never reads."""
    folder = Path(folder)
    path = folder / "result.json"
    if not path.is_file():
        raise MapPruneError(f"{folder} holds no finished defense result: result.json is missing")
    run, name = folder.parent.parent, folder.name
    fix = f"rerun the defense that wrote it with --overwrite (mapprune defend DEFENSE {run} --name {name} --overwrite)"
    r = upgrade_result(_read_json(path, "defense result", fix), path)
    check_keys(r, keys, path, fix)
    return r


def model_from_manifest(m: dict):
    spec = m["model"]
    return create_model(spec["name"], spec["num_classes"], width=spec.get("width"),
                        in_channels=spec["in_channels"], mean=spec["mean"], std=spec["std"])


def load_model_file(m: dict, path: Path):
    model = model_from_manifest(m)
    tensors, _ = load_tensors(path)
    load_state_into(model, tensors, path, what=f"{m['model']['name']} with {m['model']['num_classes']} classes")
    return model.eval()


def attack_from_manifest(m: dict, run: Path) -> Attack:
    cfg = dict(m["attack"])
    name = cfg.pop("name")
    cfg.pop("clean_label", None)
    try:
        attack = create_attack(name, m["dataset"]["image_shape"], m["dataset"]["num_classes"], **cfg)
    except (TypeError, ValueError) as e:  # a setting of another name or type than the attack takes
        raise MapPruneError(f"{Path(run) / MANIFEST} is damaged: its attack settings do not fit the {name} attack "
                            f"({e}); restore manifest.json from a copy or re-create the run") from None
    tensors, _ = load_tensors(run / "attack.safetensors")
    attack.load_state({k[6:]: v for k, v in tensors.items() if k.startswith("state.")})
    return attack


@dataclass
class Run:
    """A finished attack run, loaded: everything needed to evaluate or defend it."""

    path: Path
    manifest: dict
    model: torch.nn.Module
    attack: Attack
    dataset: ImageDataset
    poison_indices: torch.Tensor

    def test_sets(self) -> dict:
        d = self.dataset
        return self.attack.test_sets(d.x_test, d.y_test)


def load_run(run, data_dir=None) -> Run:
    """Reloads a run folder: model, attack and the dataset it was trained on (checked by fingerprint)."""
    run = Path(run)
    m = read_manifest(run)
    check_keys(m, RUN_KEYS, run / MANIFEST, MANIFEST_FIX)
    model = load_model_file(m, run / "model.safetensors")
    attack = attack_from_manifest(m, run)
    tensors, _ = load_tensors(run / "attack.safetensors")
    ds_info = m["dataset"]
    dataset = load_dataset(ds_info["registry"], data_dir if data_dir is not None else ds_info["data_dir"])
    if dataset.fingerprint() != ds_info["fingerprint"]:
        warnings.warn(f"the {ds_info['name']} data found now differs from the data the run was trained on "
                      f"(fingerprint {dataset.fingerprint()} vs {ds_info['fingerprint']})", MapPruneWarning, stacklevel=2)
    return Run(run, m, model, attack, dataset, tensors["poison_indices"])
