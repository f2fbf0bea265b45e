"""Does a removed backdoor come back? The retuning attack of Min et al. (NeurIPS 2024, "Uncovering, Explaining,
and Mitigating the Superficial Safety of Backdoor Defense"), measured beside its control.

Retuning fine-tunes the repaired model for a few epochs on a small set of training images of which a few carry the
run's real trigger, relabelled to the target. A repair that only hid the backdoor relearns it from those few
images at once; one that removed it learns it no faster than a model that never had it. The **control** is that
model: a clean run of the same dataset (``poison count`` 0 in its manifest), retuned on the same set with the same
trigger. A relapse is the repaired model's ASR after retuning well above the control's.

The defaults are the paper's (its code, ``fine_tune/ft_poison.py`` of the BackdoorSafetyTuning repository): 1,000
random training images whose first 5 are replaced by poisoned training images (triggered, target label), SGD lr
0.01, momentum 0.9, no weight decay, no schedule, batch 128, 5 epochs. Where ours differs: the poisoned images are
drawn from the images the backdoor acts on (non-target classes; a source-specific attack's source classes), as in
the attacks' own poisoning,
and every image of the set gets the training augmentation (the paper leaves the poisoned ones unaugmented).

It uses the real trigger, so like ``diagnose`` it evaluates a defense and is never part of one.
"""

import copy
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..device import pick_device
from ..errors import MapPruneError
from ..evaluation import defended_model
from ..metrics import evaluate
from ..runs import Run, acquire_folder_lock, atomic_write_text, json_text, load_run
from ..train import TrainConfig, train


@dataclass(frozen=True)
class Retuning:
    """The retuning attack's settings (the paper's by default)."""

    images: int = 1000  # the retuning set's size
    poisoned: int = 5  # how many of them carry the trigger with the target label
    epochs: int = 5
    lr: float = 0.01
    batch_size: int = 128

    def check(self, train_size: int | None = None) -> None:
        """One line naming what is wrong, before any work (the set's size against the training set's once that
        is known)."""
        if self.images < 1 or (train_size is not None and self.images > train_size):
            raise MapPruneError(f"--images is the retuning set's size, 1 to the training set's {train_size}; got "
                                f"{self.images}")
        if not 0 <= self.poisoned <= self.images:
            raise MapPruneError(f"--poisoned is how many of the {self.images} retuning images carry the trigger, 0 to "
                                f"{self.images}; got {self.poisoned}")
        if self.epochs < 1 or self.batch_size < 1:
            raise MapPruneError(f"--epochs and --batch-size are at least 1; got {self.epochs} and {self.batch_size}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise MapPruneError(f"--lr is a positive learning rate; got {self.lr}")


def retuning_set(run: Run, settings: Retuning, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images, labels, indices of the poisoned ones in the set): ``settings.images`` training images drawn with
    ``seed``, of which the first ``settings.poisoned`` are replaced by triggered training images the backdoor
    acts on (:meth:`~mapprune.attacks.base.Attack.backdoor_sources`: non-target images, a source-specific attack's
    source classes) labelled with the attack's target."""
    ds, attack = run.dataset, run.attack
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(ds.y_train), generator=g)
    x, y = ds.x_train[order[:settings.images]].clone(), ds.y_train[order[:settings.images]].clone()
    if settings.poisoned:
        rest = order[settings.images:]
        eligible = torch.zeros(len(ds.y_train), dtype=torch.bool)
        eligible[attack.backdoor_sources(ds.y_train)] = True
        sources = rest[eligible[rest]]  # the images the backdoor acts on (TaCT: its source classes only)
        if len(sources) < settings.poisoned:
            raise MapPruneError(f"the training set has only {len(sources)} images left to poison; lower --poisoned")
        chosen = sources[:settings.poisoned]
        x[:settings.poisoned] = attack.apply(ds.x_train[chosen])
        y[:settings.poisoned] = attack.target_labels(ds.y_train[chosen])
    return x, y, torch.arange(settings.poisoned)


def retune(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, settings: Retuning, seed: int, device,
           progress: bool = False) -> torch.nn.Module:
    """A copy of ``model`` fine-tuned on the retuning set (the paper's optimiser: SGD, momentum 0.9, no weight
    decay, constant lr); ``model`` itself is left as it was."""
    tuned = copy.deepcopy(model)
    cfg = TrainConfig(epochs=settings.epochs, batch_size=settings.batch_size, lr=settings.lr, momentum=0.9,
                      weight_decay=0.0, schedule="constant", seed=seed)
    train(tuned, x, y, cfg, device=device, progress=progress, desc="retune")
    return tuned.eval()


def _clean_control(path: Path, run: Run, data_dir) -> Run:
    control = load_run(path, data_dir)
    if int(control.manifest.get("poison", {}).get("count", 0)) > 0:
        raise MapPruneError(f"--control {path} is a backdoored run ({control.manifest['poison']['count']} poisoned "
                            "images); the control is a model that never had a backdoor (a run made with "
                            "--poison-ratio 0)")
    if control.dataset.name != run.dataset.name or control.dataset.num_classes != run.dataset.num_classes:
        raise MapPruneError(f"--control {path} was trained on {control.dataset.name}, the run on {run.dataset.name}; "
                            "the control must share the run's data")
    return control


def relapse(run_path, *, defense: str | None = None, control=None, settings: Retuning = Retuning(),
            seeds: tuple[int, ...] = (0,), data_dir=None, device=None, progress: bool = False) -> dict:
    """Retunes the run's model repaired by ``defense`` (its own model when None) and, with ``control`` (a clean run
    folder), the control, once per seed; writes ``relapse.json`` into the defense's folder (the run's for the
    undefended model) and returns it: the settings, and per model and seed ACC / ASR / RA before and after."""
    if not seeds or len(set(seeds)) != len(seeds):
        raise MapPruneError(f"--seeds are distinct seeds, at least one; got {list(seeds)}")
    settings.check()
    run_path = Path(run_path)
    run = load_run(run_path, data_dir)
    settings.check(len(run.dataset.y_train))
    model, folder = (run.model, run_path) if defense is None else (defended_model(run, run_path, defense),
                                                                   run_path / "defense" / defense)
    models = {"repaired" if defense else "undefended": model}
    if control is not None:
        models["control"] = _clean_control(Path(control), run, data_dir).model
    # taken before the work: refused in one line while another command writes the folder
    lock = acquire_folder_lock(folder, "relapse")
    try:
        return _retune_all(run, run_path, folder, models, defense, control, settings, seeds, device, progress)
    finally:
        lock.release()


def _retune_all(run: Run, run_path: Path, folder: Path, models: dict, defense, control, settings: Retuning,
                seeds, device, progress) -> dict:
    dev = pick_device(device)
    tests = run.test_sets()
    report = {"kind": "relapse", "run": str(run_path), "defense": defense, "control": None if control is None
              else str(control), "attack": run.manifest["attack"]["name"], "settings": asdict(settings),
              "seeds": list(seeds), "models": {}}
    for name, m in models.items():
        before = _rates(evaluate(m.to(dev), tests))
        after = []
        for seed in seeds:
            x, y, _ = retuning_set(run, settings, seed)
            after.append(_rates(evaluate(retune(m, x, y, settings, seed, dev, progress), tests)))
        report["models"][name] = {"before": before, "after": after,
                                  "asr_after_mean": sum(a["asr"] for a in after) / len(after)}
    atomic_write_text(folder / "relapse.json", json_text(report, indent=1))
    return report


def _rates(metrics: dict) -> dict:
    return {k: metrics[k] for k in ("acc", "asr", "ra")}
