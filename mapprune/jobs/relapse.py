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

The **reactivation by input** of Zhu et al. (NeurIPS 2024, "Breaking the False Sense of Security in Backdoor
Defense through Re-Activation Attack", :mod:`mapprune.attacks.reactivation`) asks the same question without
touching the weights: one universal perturbation of L-infinity norm at most ``eps`` (the paper's 0.05), searched on
the model with ``images`` triggered training images, added to the triggered test images. Beside it, the same
search on the same images without the trigger (the paper's generic universal adversarial perturbation), which
tells a dormant backdoor from a plain adversarial weakness; and both on the clean control.

**Where the relapsed backdoor lives** (:func:`carriers`, for a repaired model): the maps the repair silenced (a conv
filter all zero, as FMT, FP and ANP prune) and how many of them retuning revived, and the maps that carry the
trigger after retuning (the largest trigger response, :func:`~mapprune.jobs.diagnose.truth.trigger_response`)
compared with those that carried it in the undefended model and in the repaired one before retuning. A repair
whose pruned maps stay silent but whose relapsed backdoor runs through the undefended model's own carriers left
part of the backdoor's path in place.

It uses the real trigger, so like ``diagnose`` it evaluates a defense and is never part of one.
"""

import copy
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..attacks.reactivation import perturbed, universal_perturbation
from ..device import pick_device
from ..errors import MapPruneError
from ..evaluation import defended_model
from ..figures import pyplot
from ..metrics import accuracy, evaluate, predict
from ..runs import Run, acquire_folder_lock, atomic_write_text, json_text, load_run
from ..train import TrainConfig, train
from .diagnose.truth import evaluation_images, trigger_response

CARRIERS = 25  # maps compared by :func:`carriers`: FMT's pruning count on a width-16 PreActResNet18
CARRIER_IMAGES = 1000  # test images each trigger response is measured on


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


@dataclass(frozen=True)
class Reactivation:
    """The reactivation search's settings (the paper's budget by default)."""

    eps: float = 0.05  # the perturbation's L-infinity bound on [0, 1] pixels
    steps: int = 100  # sign-gradient steps of eps / 10, one mini-batch each
    images: int = 500  # the attacker's triggered training images the perturbation is searched on
    batch_size: int = 128

    def check(self, train_size: int | None = None) -> None:
        """One line naming what is wrong, before any work."""
        if not (math.isfinite(self.eps) and 0 < self.eps <= 1):
            raise MapPruneError(f"--reactivation-eps is an L-infinity bound on [0, 1] pixels, in (0, 1]; got "
                                f"{self.eps}")
        if self.steps < 1:
            raise MapPruneError(f"--reactivation-steps is at least 1; got {self.steps}")
        if self.images < 1 or (train_size is not None and self.images > train_size):
            raise MapPruneError(f"--reactivation-images is the search set's size, 1 to the training set's "
                                f"{train_size}; got {self.images}")


def reactivation_set(run: Run, settings: Reactivation, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(clean images, their attack targets): ``settings.images`` training images the backdoor acts on, drawn
    with ``seed``. The search triggers them with the run's attack (reactivation) or leaves them clean (the
    generic perturbation)."""
    y_train = run.dataset.y_train
    sources = run.attack.backdoor_sources(y_train)
    g = torch.Generator().manual_seed(10_000 + seed)  # not the retuning set's draw
    chosen = sources[torch.randperm(len(sources), generator=g)[:settings.images]]
    return run.dataset.x_train[chosen], run.attack.target_labels(y_train[chosen])


def reactivate(model: torch.nn.Module, run: Run, settings: Reactivation, seed: int, device) -> dict:
    """The target rate on the test set of the model's reactivation: ``asr`` (triggered test images plus the
    perturbation searched on triggered images) beside ``generic`` (clean test images of the backdoor's sources
    plus a perturbation searched on the same images without the trigger) and ``asr_without`` (the triggered
    test images with no perturbation)."""
    x, target = reactivation_set(run, settings, seed)
    kw = {"eps": settings.eps, "steps": settings.steps, "batch_size": settings.batch_size, "seed": seed,
          "device": device}
    delta = universal_perturbation(model, run.attack.apply(x), target, **kw)
    generic = universal_perturbation(model, x, target, **kw)
    ds = run.dataset
    keep = run.attack.backdoor_sources(ds.y_test)
    x_bd, y_target, _ = run.test_sets()["backdoor"]
    return {"asr": accuracy(predict(model, perturbed(x_bd, delta)), y_target),
            "generic": accuracy(predict(model, perturbed(ds.x_test[keep], generic)),
                                run.attack.target_labels(ds.y_test[keep])),
            "asr_without": accuracy(predict(model, x_bd), y_target),
            "delta_linf": float(delta.abs().max())}


def silenced_maps(model: torch.nn.Module) -> set[tuple[str, int]]:
    """(conv name, channel) of every conv filter that is all zero: the maps a pruning repair silenced."""
    return {(name, int(c)) for name, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)
            for c in torch.nonzero(m.weight.detach().flatten(1).abs().amax(1) == 0).flatten()}


def top_carriers(model: torch.nn.Module, clean: torch.Tensor, triggered: torch.Tensor, top: int,
                 device) -> list[tuple[str, int]]:
    """The ``top`` maps (conv name, channel) whose response to the trigger is largest (the diagnosis's trigger
    response: the shift between triggered and clean images, in clean spreads)."""
    response = trigger_response(model.to(device), clean, triggered)
    owners = [(name, c) for name, r in response.items() for c in range(len(r))]
    flat = torch.cat([r.double() for r in response.values()])
    return [owners[i] for i in flat.topk(min(top, len(flat))).indices.tolist()]


def carriers(run: Run, undefended: torch.nn.Module, repaired: torch.nn.Module, retuned: torch.nn.Module,
             device, top: int = CARRIERS, seed: int = 0) -> dict:
    """Where the relapsed backdoor lives (see the module's docstring): counts of silenced and revived maps, and of
    the retuned model's ``top`` trigger carriers that were the undefended model's, the repaired model's, or
    silenced; ``chance``: the overlap two random sets of ``top`` maps would have."""
    _, _, clean, triggered, _ = evaluation_images(run, CARRIER_IMAGES, seed)
    silenced = silenced_maps(repaired)
    after = top_carriers(retuned, clean, triggered, top, device)
    total = sum(m.out_channels for m in retuned.modules() if isinstance(m, torch.nn.Conv2d))
    return {"top": len(after), "maps": total, "chance": round(len(after) ** 2 / total, 2),
            "silenced": len(silenced), "revived": len(silenced - silenced_maps(retuned)),
            "carriers_silenced": len(silenced.intersection(after)),
            "carriers_of_undefended": len(set(top_carriers(undefended, clean, triggered, top, device)) & set(after)),
            "carriers_of_repaired": len(set(top_carriers(repaired, clean, triggered, top, device)) & set(after))}


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
           progress: bool = False, tests: dict | None = None) -> tuple[torch.nn.Module, list[dict]]:
    """A copy of ``model`` fine-tuned on the retuning set (the paper's optimiser: SGD, momentum 0.9, no weight
    decay, constant lr), and with ``tests`` its ACC / ASR / RA after each epoch; ``model`` itself is left as it
    was."""
    tuned = copy.deepcopy(model)
    cfg = TrainConfig(epochs=settings.epochs, batch_size=settings.batch_size, lr=settings.lr, momentum=0.9,
                      weight_decay=0.0, schedule="constant", seed=seed)
    history = train(tuned, x, y, cfg, device=device, progress=progress, desc="retune",
                    eval_fn=None if tests is None else (lambda m: _rates(evaluate(m, tests))))
    return tuned.eval(), [{k: h[k] for k in ("epoch", "acc", "asr", "ra")} for h in history if "asr" in h]


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
            reactivation: Reactivation | None = Reactivation(), seeds: tuple[int, ...] = (0,), data_dir=None,
            device=None, progress: bool = False) -> dict:
    """Retunes the run's model repaired by ``defense`` (its own model when None) and, with ``control`` (a clean run
    folder), the control, once per seed, and (unless ``reactivation`` is None) searches each model's reactivation
    perturbation once per seed; writes ``relapse.json`` into the defense's folder (the run's for the undefended
    model) and returns it: the settings, and per model and seed ACC / ASR / RA before and after retuning, and the
    reactivation's target rates."""
    if not seeds or len(set(seeds)) != len(seeds):
        raise MapPruneError(f"--seeds are distinct seeds, at least one; got {list(seeds)}")
    settings.check()
    if reactivation is not None:
        reactivation.check()
    run_path = Path(run_path)
    run = load_run(run_path, data_dir)
    settings.check(len(run.dataset.y_train))
    if reactivation is not None:
        reactivation.check(len(run.dataset.y_train))
    model, folder = (run.model, run_path) if defense is None else (defended_model(run, run_path, defense),
                                                                   run_path / "defense" / defense)
    models = {"repaired" if defense else "undefended": model}
    if control is not None:
        models["control"] = _clean_control(Path(control), run, data_dir).model
    # taken before the work: refused in one line while another command writes the folder
    lock = acquire_folder_lock(folder, "relapse")
    try:
        return _retune_all(run, run_path, folder, models, defense, control, settings, reactivation, seeds, device,
                           progress)
    finally:
        lock.release()


def _retune_all(run: Run, run_path: Path, folder: Path, models: dict, defense, control, settings: Retuning,
                reactivation: Reactivation | None, seeds, device, progress) -> dict:
    dev = pick_device(device)
    tests = run.test_sets()
    report = {"kind": "relapse", "run": str(run_path), "defense": defense, "control": None if control is None
              else str(control), "attack": run.manifest["attack"]["name"], "settings": asdict(settings),
              "reactivation_settings": None if reactivation is None else asdict(reactivation),
              "seeds": list(seeds), "models": {}}
    for name, m in models.items():
        before = _rates(evaluate(m.to(dev), tests))
        after, by_epoch, first = [], [], None
        for seed in seeds:
            x, y, _ = retuning_set(run, settings, seed)
            model, history = retune(m, x, y, settings, seed, dev, progress, tests=tests)
            first = model if first is None else first  # where the relapse lives is read from the first seed's
            after.append({k: history[-1][k] for k in ("acc", "asr", "ra")})
            by_epoch.append(history)
        report["models"][name] = {"before": before, "after": after, "by_epoch": by_epoch,
                                  "asr_after_mean": sum(a["asr"] for a in after) / len(after)}
        if name == "repaired":
            report["models"][name]["carriers"] = carriers(run, run.model, m, first, dev, seed=seeds[0])
        if reactivation is not None:
            found = [reactivate(m, run, reactivation, seed, dev) for seed in seeds]
            report["models"][name].update(reactivation=found,
                                          reactivation_asr_mean=sum(r["asr"] for r in found) / len(found),
                                          generic_mean=sum(r["generic"] for r in found) / len(found))
    atomic_write_text(folder / "relapse.json", json_text(report, indent=1))
    save_relapse_figure(folder / "relapse.png", report)
    return report


def save_relapse_figure(path: Path, report: dict) -> None:
    """ASR against retuning epochs, one line per model and seed (the repaired or undefended model beside the
    control), each starting from the model's ASR before retuning."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for (name, m), colour in zip(report["models"].items(), ("tab:red", "tab:blue", "tab:green")):
        for i, history in enumerate(m["by_epoch"]):
            ax.plot([0] + [h["epoch"] for h in history], [100 * m["before"]["asr"]] + [100 * h["asr"] for h in history],
                    color=colour, marker="o", ms=3, alpha=0.8, label=name if i == 0 else None)
    ax.set_xlabel("retuning epoch")
    ax.set_ylabel("ASR (%)")
    ax.set_ylim(-2, 102)
    s = report["settings"]
    ax.set_title(f"{report['defense'] or 'undefended'}: {s['poisoned']} poisoned of {s['images']} images, lr {s['lr']:g}",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _rates(metrics: dict) -> dict:
    return {k: metrics[k] for k in ("acc", "asr", "ra")}
