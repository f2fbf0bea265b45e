"""Making a backdoored model: poison the training set, train with the one loop, evaluate, write the run."""

import json
import time
import warnings
from dataclasses import asdict, fields
from pathlib import Path

import torch

from ..attacks import ATTACKS, attack_class, create_attack, load_plugins
from ..checkpoint import atomic_save, save_model
from ..data import DATASETS, load_dataset
from ..device import peak_memory_mb, pick_device
from ..errors import MapPruneError, MapPruneWarning, unknown_name
from ..figures import save_samples
from ..metrics import evaluate
from ..migrate import MANIFEST_VERSION
from ..models import MODELS, create_model
from ..options import check_options
from ..presets import PRESETS
from ..runs import RunWriter, dataset_record, versions, write_json
from ..train import TrainConfig, train

SETTINGS = "run_settings.json"  # in RUN.partial while training: what the checkpoint there was made with


def _warn_if_target_class_consumed(atk, y_train: torch.Tensor, count: int, num_classes: int) -> float | None:
    """Share of the target class a clean-label attack poisoned; warns when that is all of it.

    With every target-class image carrying the trigger, the model learns that class only through the trigger and
    (as measured for SIG and LC on CIFAR-10 at ratio 0.1) never predicts it on clean images.
    """
    if not atk.clean_label:
        return None
    n_target = int((y_train == atk.target).sum())
    share = count / n_target if n_target else 0.0
    if n_target and count == n_target:
        warnings.warn(f"{atk.name} is clean-label and poison ratio {atk.poison_ratio} covers all {n_target} training "
                      f"images of class {atk.target}: the model may never predict class {atk.target} without the "
                      f"trigger (clean accuracy near or below {1 - 1 / num_classes:.0%}); a smaller --poison-ratio "
                      "keeps some clean target-class images", MapPruneWarning, stacklevel=2)
    return share


def _check_resumable(writer: RunWriter, overwrite: bool, settings: dict) -> None:
    """A ``.partial`` folder left by an interrupted run is resumed only by the same command.

    The training checkpoint only records the training settings, so without this check an interrupted BadNets
    run would silently be continued as, say, a Blended run with another target.
    """
    settings = json.loads(json.dumps(settings))
    path = writer.path(SETTINGS)
    ckpt = writer.path("train_checkpoint.safetensors")
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError):
            old = None
        if old != settings and ckpt.is_file():
            if not overwrite:
                raise MapPruneError(
                    f"{writer.partial} holds an interrupted run made with other settings; rerun that command to "
                    "resume it, or pass --overwrite (or delete the folder) to start afresh"
                )
            ckpt.unlink()
    write_json(path, settings)


def read_exclusion(path) -> list[int]:
    """The training indices in ``path``: a JSON list of whole numbers, or an object whose ``indices`` is one (the
    ``flagged.json`` that ``mapprune cleanse`` writes). Sorted, each once; anything else is refused in one line. JSON
    only: the file is never unpickled or executed."""
    path = Path(path)
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        raise MapPruneError(f"--exclude {path}: no such file") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise MapPruneError(f"--exclude {path} is not readable JSON ({e}); give a JSON list of training indices or a "
                            "flagged.json written by mapprune cleanse") from None
    indices = obj.get("indices") if isinstance(obj, dict) else obj
    if not isinstance(indices, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in indices):
        raise MapPruneError(f"--exclude {path} holds no list of whole numbers (a JSON list of training indices, or an "
                            "object with an \"indices\" list such as cleanse's flagged.json)")
    return sorted(set(indices))


def save_run_files(writer: RunWriter, model, spec: dict, atk, poison_indices: torch.Tensor, ds, dataset: str) -> dict:
    """A run's files beside its manifest: model.safetensors, attack.safetensors (the trigger's state and the
    poison indices) and samples.png (the first test image of each of eight classes, clean and triggered).
    Returns what every manifest starts with: its version, the model, the attack and the dataset."""
    save_model(model.cpu(), writer.path("model.safetensors"), {"model": spec})
    state = {f"state.{k}": v for k, v in atk.state().items()}
    atomic_save({**state, "poison_indices": poison_indices}, writer.path("attack.safetensors"), {"attack": atk.config()})
    show = torch.stack([torch.nonzero(ds.y_test == c)[0, 0] for c in ds.y_test.unique()[:8]])
    save_samples(writer.path("samples.png"), ds.x_test[show], atk.apply(ds.x_test[show]))
    return {"schema_version": MANIFEST_VERSION, "kind": "attack", "model": spec, "attack": atk.config(),
            "dataset": dataset_record(ds, dataset)}


def attack_run(
    attack: str,
    out: Path,
    *,
    dataset: str = "cifar10",
    data_dir=None,
    preset: str | None = None,
    model: str | None = None,
    width: int | None = None,
    target: int = 0,
    all_to_all: bool = False,
    poison_ratio: float = 0.1,
    seed: int = 0,
    device: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    eval_every: int = 1,
    attack_kw: dict | None = None,
    exclude=None,
    **train_kw,
) -> dict:
    """Trains a backdoored model and writes a complete run folder at ``out``; returns the manifest.

    ``preset`` fills model, width and training settings; explicit arguments (not None) override it.
    ``eval_every`` sets how often the history records test metrics (the last epoch always does).
    ``exclude``: a file of training indices (:func:`read_exclusion`) left out of training after the poisoning (the
    same images are poisoned as without it), recorded in the manifest: retraining on a cleansed training set.
    """
    if preset is not None and preset not in PRESETS:
        raise unknown_name("preset", preset, PRESETS)
    p = dict(PRESETS.get(preset or "paper"))
    model = model or p.pop("model")
    p.pop("model", None)
    width = width if width is not None else p.pop("width")
    p.pop("width", None)
    p.update({k: v for k, v in train_kw.items() if v is not None})
    known = {f.name for f in fields(TrainConfig)}
    bad = set(p) - known
    if bad:
        raise MapPruneError(f"unknown training settings {sorted(bad)}; valid: {sorted(known)}")
    if eval_every < 1:  # checked here too: train() would only see it after the poisoning and resources
        raise MapPruneError(f"--eval-every must be a positive number of epochs, got {eval_every}")
    # Names are checked before anything is written, so a typo leaves no folder behind.
    load_plugins()
    for kind, name, registry in (("dataset", dataset, DATASETS), ("attack", attack, ATTACKS), ("model", model, MODELS)):
        if name not in registry:
            raise unknown_name(kind, name, registry)
    attack_kw = check_options(attack_class(attack), attack_kw or {}, attack)  # each value of the type it takes
    excluded = read_exclusion(exclude) if exclude is not None else None
    writer = RunWriter(out, overwrite)  # refuses an existing run before any work is done
    try:
        dev = pick_device(device)
        t_start = time.perf_counter()
        ds = load_dataset(dataset, data_dir)
        try:
            atk = create_attack(attack, ds.image_shape, ds.num_classes, target=target, all_to_all=all_to_all,
                                poison_ratio=poison_ratio, **attack_kw)
        except TypeError as e:  # an option the attack does not take
            raise MapPruneError(f"{attack}: {e}; see the attack's class in mapprune/attacks/ for its options") from None
        cfg = TrainConfig(seed=seed, hflip=ds.hflip, **p)
        cfg.validate()
        atk.prepare(ds, device=dev, progress=progress)
        if excluded and not 0 <= excluded[0] <= excluded[-1] < len(ds.y_train):
            bad = next(i for i in excluded if not 0 <= i < len(ds.y_train))
            raise MapPruneError(f"--exclude {exclude} names training index {bad}; {dataset} has {len(ds.y_train)} "
                                f"training images (0 to {len(ds.y_train) - 1})")
        if excluded and len(excluded) == len(ds.y_train):
            raise MapPruneError(f"--exclude {exclude} names every training image; nothing would be left to train on")
        x_train, y_train, poison_idx = atk.poison_train(ds.x_train, ds.y_train, seed)
        exclusion = None
        if excluded is not None:
            keep = torch.ones(len(y_train), dtype=torch.bool)
            keep[excluded] = False
            x_train, y_train = x_train[keep], y_train[keep]
            hit = int((~keep[poison_idx]).sum()) if len(poison_idx) else 0
            exclusion = {"file": str(Path(exclude)), "count": len(excluded), "poisons": hit,
                         "poisons_trained": len(poison_idx) - hit, "indices": excluded}
        target_share = _warn_if_target_class_consumed(atk, ds.y_train, len(poison_idx), ds.num_classes)
        test_sets = atk.test_sets(ds.x_test, ds.y_test)
        t_data = time.perf_counter() - t_start

        torch.manual_seed(seed)
        net = create_model(model, ds.num_classes, width=width, in_channels=ds.image_shape[0], mean=ds.mean,
                           std=ds.std)
        _check_resumable(writer, overwrite, {"attack": atk.config(), "dataset": ds.fingerprint(), "model": model,
                                             "width": width, "train": asdict(cfg), "seed": seed,
                                             **({"exclude": excluded} if excluded is not None else {})})
        t0 = time.perf_counter()
        history = train(net, x_train, y_train, cfg, device=dev, checkpoint=writer.path("train_checkpoint.safetensors"),
                        loss_fn=atk.training_loss(net),
                        eval_fn=lambda m: evaluate(m, test_sets), eval_every=eval_every, progress=progress, desc=f"{attack} {dataset}")
        t_train = time.perf_counter() - t0
        t0 = time.perf_counter()
        metrics = evaluate(net, test_sets)
        t_test = time.perf_counter() - t0

        spec = {"name": model, "num_classes": ds.num_classes, "width": width, "in_channels": ds.image_shape[0],
                "mean": list(ds.mean), "std": list(ds.std)}
        manifest = {
            **save_run_files(writer, net, spec, atk, poison_idx, ds, dataset),
            "train": asdict(cfg),
            "preset": preset,
            "seed": seed,
            "device": str(dev),
            "versions": versions(),
            "poison": {"count": len(poison_idx), "file": "attack.safetensors:poison_indices",
                       **({"target_class_share": target_share} if target_share is not None else {})},
            "timings": {"data_s": t_data, "train_s": t_train, "test_s": t_test,
                        # train_s covers this process only; an interrupted and resumed run adds its epochs here:
                        "train_epochs_s": sum(h["seconds"] for h in history),
                        "total_s": time.perf_counter() - t_start},
            "peak_memory_mb": peak_memory_mb(dev),
            "metrics": metrics,
            "history": history,
            **({"exclude": exclusion} if exclusion is not None else {}),
        }
        writer.path("train_checkpoint.safetensors").unlink(missing_ok=True)
        writer.path(SETTINGS).unlink(missing_ok=True)
        write_json(writer.path("manifest.json"), manifest)
        writer.finish()
    except BaseException:
        # A run that failed before training leaves no ".partial" folder behind; one that failed later keeps its
        # training checkpoint there, so the same command resumes. Either way the folder's lock is released.
        writer.discard_if_empty()
        raise
    return manifest
