"""The run folder: manifest.json + model.safetensors + attack.safetensors (trigger state, poison indices)
+ samples.png, plus defense/<name>/ sub-folders.

Runs are built in ``<RUN>.partial`` and renamed into place only when complete, so an interrupted command never
leaves a folder that looks complete; rerunning the same command resumes from the partial folder's checkpoint.
"""

import json
import os
import platform
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .attacks import Attack, create_attack
from .checkpoint import load_state_into, load_tensors
from .data import ImageDataset, load_dataset
from .errors import MapPruneError, MapPruneWarning
from .models import create_model

MANIFEST = "manifest.json"


def versions() -> dict:
    import numpy

    from . import __version__

    # torch_threads: CPU results can differ in the last digits with the thread count (reductions split differently).
    return {"mapprune": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "numpy": numpy.__version__, "platform": platform.platform(), "torch_threads": torch.get_num_threads()}


def write_json(path: Path, obj) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def is_complete_run(path: Path, marker: str = MANIFEST) -> bool:
    return (Path(path) / marker).is_file()


class RunWriter:
    """Builds a folder under a ``.partial`` name and moves it into place on :meth:`finish`."""

    def __init__(self, out: Path, overwrite: bool = False, marker: str = MANIFEST):
        self.out = Path(out)
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
        """Removes the ``.partial`` folder if nothing was written to it (a run that failed before training)."""
        try:
            self.partial.rmdir()
        except OSError:
            pass  # not empty (it holds a checkpoint to resume from) or already gone

    def finish(self) -> Path:
        old = None
        if self.out.exists():
            old = self.out.with_name(f"{self.out.name}.old{os.getpid()}")
            os.replace(self.out, old)
        os.replace(self.partial, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.out


def read_manifest(run: Path) -> dict:
    run = Path(run)
    path = run / MANIFEST
    if not path.is_file():
        hint = " (an interrupted run: rerun the same command to resume it)" if run.with_name(run.name + ".partial").is_dir() else ""
        raise MapPruneError(f"{run} is not a mapprune run folder: {MANIFEST} is missing{hint}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise MapPruneError(f"{path} is not valid JSON ({e}); the run folder is damaged") from None


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
    attack = create_attack(name, m["dataset"]["image_shape"], m["dataset"]["num_classes"], **cfg)
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
    model = load_model_file(m, run / "model.safetensors")
    attack = attack_from_manifest(m, run)
    tensors, _ = load_tensors(run / "attack.safetensors")
    ds_info = m["dataset"]
    dataset = load_dataset(ds_info.get("registry", ds_info["name"]),
                           data_dir if data_dir is not None else ds_info.get("data_dir"))
    if dataset.fingerprint() != ds_info["fingerprint"]:
        warnings.warn(f"the {ds_info['name']} data found now differs from the data the run was trained on "
                      f"(fingerprint {dataset.fingerprint()} vs {ds_info['fingerprint']})", MapPruneWarning, stacklevel=2)
    return Run(run, m, model, attack, dataset, tensors["poison_indices"])
