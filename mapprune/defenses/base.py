"""The defense protocol: ``repair(model, images, labels) -> DefenseResult``, plus the shared fine-tune.

Every defense gets the backdoored model and the same clean, class-balanced subset of the training set; none
sees the test set. Fine-tuning always goes through the project's one training loop.
"""

import copy
import inspect
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..data import split_holdout
from ..device import peak_memory_mb, pick_device
from ..errors import MapPruneError
from ..images import as_uint8
from ..metrics import judged_class_accuracy, predict, rejected_classes
from ..options import keyword_options
from ..train import TrainConfig, train


@dataclass
class DefenseResult:
    """What a defense returns: the repaired model and everything it measured on the way."""

    model: nn.Module
    defense: str
    params: dict
    timings: dict = field(default_factory=dict)  # seconds per phase
    peak_memory_mb: float = 0.0
    pruned: dict[str, list[int]] = field(default_factory=dict)
    scores: dict[str, torch.Tensor] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    extra: dict = field(default_factory=dict)  # method-specific results (FMT: suspected target, suspicions)
    original: nn.Module | None = None  # the model as tested (FMT keeps it for figures), not serialised
    split: dict = field(default_factory=dict)  # the fit / held-out indices into the clean subset
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # saved beside result.json (NC: its triggers)

    @property
    def num_pruned(self) -> int:
        return sum(len(v) for v in self.pruned.values())

    def to_json(self) -> dict:
        return {
            "defense": self.defense,
            "params": self.params,
            "timings": self.timings,
            "peak_memory_mb": self.peak_memory_mb,
            "num_pruned": self.num_pruned,
            "pruned": self.pruned,
            "scores": {k: [round(float(s), 6) for s in v] for k, v in self.scores.items()},
            "history": self.history,
            "split": self.split,
            **self.extra,
        }


def pick_images(x: torch.Tensor, y: torch.Tensor, n: int, seed: int, balanced: bool = False):
    """n seeded images of (x, y): uniformly drawn (the paper's), or ``balanced`` over the
    classes (n // K of each, the remainder to the first classes, so a suspected target's images are few)."""
    g = torch.Generator().manual_seed(seed)
    if not balanced:
        idx = torch.randperm(len(x), generator=g)[:n]
        return x[idx], y[idx]
    classes = torch.unique(y).tolist()
    per = [n // len(classes) + (i < n % len(classes)) for i in range(len(classes))]
    idx = []
    for c, k in zip(classes, per):
        members = torch.nonzero(y == c).flatten()
        idx.append(members[torch.randperm(len(members), generator=g)[:k]])
    idx = torch.cat(idx)
    return x[idx], y[idx]


@dataclass
class CleanData:
    """The defender's clean subset, split once (stratified, seeded) into a fitting part and a held-out selection
    part. A defense fits on ``fit`` and chooses anything it chooses (a pruning amount, a threshold) on
    ``select``'s clean accuracy; a fixed-schedule final stage (a fine-tune) may use the whole subset (``x``,
    ``y``), so every defense trains on the same images. ``fit_idx`` / ``select_idx`` index into ``x``."""

    x: torch.Tensor
    y: torch.Tensor
    fit_idx: torch.Tensor
    select_idx: torch.Tensor

    @property
    def fit(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[self.fit_idx], self.y[self.fit_idx]

    @property
    def select(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[self.select_idx], self.y[self.select_idx]

    def to_json(self) -> dict:
        return {"fit": self.fit_idx.tolist(), "select": self.select_idx.tolist()}


def split_clean(x: torch.Tensor, y: torch.Tensor, held_out: float, seed: int) -> CleanData:
    """Stratified, seeded split of the subset into fit and held-out selection parts (at least one held-out image
    per class; with ``held_out`` 0 the selection part is empty)."""
    if held_out == 0:
        return CleanData(x, y, torch.arange(len(x)), torch.zeros(0, dtype=torch.long))
    fit, sel = split_holdout(torch.arange(len(y)), y, held_out, seed)
    if len(fit) == 0:
        raise MapPruneError(f"a clean subset of {len(x)} images leaves nothing to fit on after holding out "
                            f"{held_out:.0%}; give the defense more clean images")
    return CleanData(x, y, fit, sel)


def held_out_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Clean accuracy of ``model`` on uint8 images, in full precision (no autocast): the held-out selection signal."""
    return int((predict(model, x, batch_size=512, amp=False) == y.cpu()).sum()) / max(1, len(x))


def most_aggressive(candidates, acc_of, acc0: float, max_drop: float):
    """The last candidate, in order of increasing aggressiveness, whose held-out accuracy is at least
    (1 - ``max_drop``) x ``acc0``; stops at the first that is not (more aggressive ones are not tried). Returns
    (candidate or None, [(candidate, accuracy)...] as tried)."""
    chosen, tried = None, []
    for c in candidates:
        a = acc_of(c)
        tried.append((c, a))
        if a < (1 - max_drop) * acc0:
            break
        chosen = c
    return chosen, tried


class Defense:
    """The protocol every defense follows; a subclass sets ``name`` and implements :meth:`_repair`.

    Hyperparameters are explicit keyword-only arguments of ``__init__``, validated there (so a bad value fails
    before any work); :meth:`params` reads them back from the signature, as scikit-learn's ``get_params`` does.
    ``dataset_defaults`` holds per-dataset values of options the user did not give; ``recipe_defaults`` the
    values a recipe implies (for naming variants). ``held_out`` is the share of the clean subset kept aside for
    the defense's own choices (:class:`CleanData`); ``hflip`` whether horizontal flips suit the data (training
    augmentation, where a defense trains).
    """

    name = "defense"
    dataset_defaults: dict[str, dict] = {}
    # Options that change only what the result reports, never the repaired model: a saved result stands for any
    # value of them (jobs.defend.find_result).
    report_only: tuple[str, ...] = ()

    def __init__(self, *, held_out: float = 0.2, hflip: bool = True, seed: int = 0, device=None,
                 progress: bool = False):
        if not 0 <= held_out < 1:
            raise MapPruneError(f"held_out is a share of the clean subset in [0, 1), got {held_out}")
        self.held_out, self.hflip, self.seed, self.device, self.progress = held_out, hflip, seed, device, progress

    @classmethod
    def option_names(cls) -> list[str]:
        """Every hyperparameter the defense takes: the keyword-only arguments of its ``__init__`` chain."""
        return keyword_options(cls, Defense, RUNTIME)

    @classmethod
    def defaults(cls, recipe: str | None = None) -> dict:
        """Each option's default: the signature's, overridden by ``recipe``'s values where the class has recipes."""
        out = {}
        for c in reversed(cls.__mro__):
            if "__init__" in vars(c) and issubclass(c, Defense):
                out.update({k: p.default for k, p in inspect.signature(c.__init__).parameters.items()
                            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is not None
                            and p.default is not inspect.Parameter.empty})
        out.update(cls.recipe_defaults(recipe or out.get("recipe")))
        return out

    @classmethod
    def recipe_defaults(cls, recipe: str | None) -> dict:
        return {}

    @classmethod
    def variant_name(cls, kw: dict) -> str:
        """Folder name of a variant: the defense, its recipe unless ``recommended`` (fmt-paper), then every option
        given that differs from its default (fmt-paper-mask, fmt-outlier, fmt-eps0.1), -detect for a detect-only
        run, and -seedN for seed N != 0. Two different settings never share a folder."""
        recipe = kw.get("recipe")
        defaults = cls.defaults(recipe)
        name = cls.name if recipe in (None, "recommended") else f"{cls.name}-{recipe}"
        for k, v in kw.items():
            if isinstance(v, list | tuple):
                v = tuple(v)
                if isinstance(defaults.get(k), tuple) and tuple(map(float, defaults[k])) == tuple(map(float, v)):
                    continue
                v = "_".join(f"{e:g}" if isinstance(e, float) else str(e) for e in v)
            if k in ("recipe", "seed", "detect_only") or v is None or defaults.get(k, None) == v:
                continue
            if k == "selection":
                name += f"-{v}"
            elif isinstance(v, bool):
                name += f"-{k.replace('_', '')}" if v else f"-no{k.replace('_', '')}"
            else:
                name += f"-{k.replace('_', '')}{v:g}" if isinstance(v, float) else f"-{k.replace('_', '')}{v}"
        if kw.get("detect_only"):
            name += "-detect"
        if kw.get("seed"):
            name += f"-seed{kw['seed']}"
        return name

    def params(self) -> dict:
        return {k: getattr(self, k) for k in self.option_names() if hasattr(self, k)}

    def repair(self, model: nn.Module, images, labels) -> DefenseResult:
        """Repairs a copy of ``model`` (the original is untouched) with clean ``images`` and ``labels``."""
        y = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        x = as_uint8(images, y, what="clean images")
        data = self.split(x, y)
        device = pick_device(self.device)
        model = copy.deepcopy(model).to(device).eval()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        result = self._repair(model, data, device)
        result.timings["total"] = time.perf_counter() - t0
        result.peak_memory_mb = peak_memory_mb(device)
        result.model = result.model.eval()
        result.split = data.to_json()
        return result

    def split(self, x: torch.Tensor, y: torch.Tensor) -> CleanData:
        """The clean subset as this defense splits it (fit / held-out)."""
        return split_clean(x, y, self.held_out, self.seed)

    def _repair(self, model: nn.Module, data: CleanData, device) -> DefenseResult:
        raise NotImplementedError

    def result(self, model, timings: dict, **kw) -> DefenseResult:
        return DefenseResult(model, self.name, self.params(), timings, **kw)


RUNTIME = ("device", "progress")  # how a defense runs, not what it computes: not recorded as parameters


# The fine-tunes every fine-tuning defense can use (FMT and FT share them, so pruning's own effect stays visible):
# the fine-tune fields of FMT's recipes (``paper``, ``recommended``, ``durable``), each documented with its measurement in
# mapprune/defenses/fmt/config.py (FMTConfig). Read through :func:`finetunes` (config.py imports nothing of
# mapprune, but mapprune.defenses.fmt imports this module).
def finetunes() -> dict[str, dict]:
    from .fmt.config import FINETUNES  # lazy: import cycle (mapprune.defenses.fmt imports this module)

    return FINETUNES


class FineTuning(Defense):
    """A defense that ends with the shared fine-tune on the whole clean subset. ``recipe`` picks the defaults of
    every fine-tune hyperparameter left as None (``recommended``, ``paper`` or ``durable``); an explicit value always
    wins."""

    def __init__(self, *, recipe: str = "recommended", epochs: int | None = None, lr: float | None = None,
                 batch_size: int | None = None, weight_decay: float | None = None, min_lr: float | None = None,
                 schedule: str | None = None, nesterov: bool | None = None, distill: float | None = None,
                 relearn_lr: float | None = None, **kw):
        super().__init__(**kw)
        if recipe not in finetunes():
            raise MapPruneError(f"unknown recipe {recipe!r}; valid: {', '.join(finetunes())}")
        self.recipe = recipe
        given = {"epochs": epochs, "lr": lr, "batch_size": batch_size, "weight_decay": weight_decay,
                 "min_lr": min_lr, "schedule": schedule, "nesterov": nesterov, "distill": distill,
                 "relearn_lr": relearn_lr}
        for k, v in given.items():
            setattr(self, k, finetunes()[recipe][k] if v is None else v)
        # Fails here, before any work, rather than after a testing or pruning phase.
        if self.epochs > 0:
            self.finetune_config().validate()
        elif self.epochs < 0:
            raise MapPruneError(f"epochs must be >= 0, got {self.epochs}")
        if self.distill < 0:
            raise MapPruneError(f"distill must be >= 0, got {self.distill}")
        if not self.relearn_lr >= 0:
            raise MapPruneError(f"relearn_lr is the fine-tune's learning rate when the model rejects a class, > 0 "
                                f"(or 0: the lr never changes); got {self.relearn_lr}")
        self._fine_tune: dict = {}  # what the fine-tune decided or saw, for result.json's "fine_tune"
        self._incoming_acc: list | None = None  # incoming_class_accuracy's, for one repair

    def repair(self, model: nn.Module, images, labels) -> DefenseResult:
        self._fine_tune, self._incoming_acc = {}, None
        result = super().repair(model, images, labels)
        if self._fine_tune:
            result.extra["fine_tune"] = self._fine_tune
        return result

    def incoming_class_accuracy(self, incoming: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list:
        """The incoming model's per-class accuracy on the clean subset, computed once per repair (a defense that
        reads it before its fine-tune, FMT's gate, and the fine-tune's learning rate share it)."""
        if self._incoming_acc is None:
            self._incoming_acc = judged_class_accuracy(predict(incoming, x), y.cpu(), int(y.max()) + 1)
        return self._incoming_acc

    def finetune_lr(self, incoming: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
        """The fine-tune's learning rate: ``relearn_lr`` when the incoming model rejects a class of the clean
        subset (:func:`~mapprune.metrics.rejected_classes`: accuracy under a quarter of the median class's, what a
        clean-label attack that poisoned its whole target class leaves), since that class must be learnt again;
        ``lr`` otherwise. Trigger-free: only the defender's clean images are used. Recorded in result.json."""
        if not self.relearn_lr:
            return self.lr
        class_acc = self.incoming_class_accuracy(incoming, x, y)
        rejected = rejected_classes(class_acc)
        lr = self.relearn_lr if rejected else self.lr
        self._fine_tune.update({"lr": lr, "rejected_classes": rejected, "class_acc": class_acc})
        return lr

    @classmethod
    def recipe_defaults(cls, recipe: str | None) -> dict:
        return dict(finetunes().get(recipe or "recommended", {}))

    def finetune_config(self, lr: float | None = None) -> TrainConfig:
        """The shared fine-tune: SGD with momentum 0.9 and the recipe's schedule (see :func:`finetunes`)."""
        return TrainConfig(epochs=self.epochs, batch_size=self.batch_size, lr=lr or self.lr, momentum=0.9,
                           weight_decay=self.weight_decay, schedule=self.schedule, min_lr=self.min_lr,
                           nesterov=self.nesterov, hflip=self.hflip, seed=self.seed)

    def finetune(self, model, x, y, after_step=None, device=None, teacher: nn.Module | None = None,
                 transform=None, incoming: nn.Module | None = None) -> list[dict]:
        """The shared fine-tune. With ``distill`` > 0 and a ``teacher`` (the model as it came in), the loss adds
        ``distill`` x the KL divergence to the teacher's softened predictions (temperature 4) on the same clean
        batch: the teacher's knowledge of clean images, which 10% of the data alone cannot rebuild.
        ``transform(images, labels, generator) -> (images, labels)`` changes each batch the student sees; the
        teacher still sees the batch as it was (so an image stamped with a candidate trigger is taught to give
        the teacher's answer on the unstamped image). ``incoming``: the model as the defense received it (default:
        the teacher, else ``model``), whose clean per-class accuracy picks the learning rate (:meth:`finetune_lr`)."""
        if self.epochs == 0:
            return []
        incoming = incoming if incoming is not None else teacher if teacher is not None else model
        lr = self.finetune_lr(incoming, x, y)
        loss_fn, seen = None, {}
        if transform is not None:
            inner = transform

            def transform(xb, yb, g):
                out = inner(xb, yb, g)
                seen["clean"] = xb if len(out) == 2 else xb[out[2]]  # an appending transform says the sources
                return out[:2]
        if self.distill > 0 and teacher is not None:
            teacher = teacher.eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
            w, t = self.distill, 4.0

            def loss_fn(out, xb, yb):
                with torch.no_grad():
                    soft = F.softmax(teacher(seen.get("clean", xb)).float() / t, 1)
                kd = F.kl_div(F.log_softmax(out.float() / t, 1), soft, reduction="batchmean") * t * t
                return F.cross_entropy(out, yb) + w * kd
        history = train(model, x, y, self.finetune_config(lr), device=device, after_step=after_step,
                        loss_fn=loss_fn, transform=transform, progress=self.progress, desc=f"{self.name} fine-tune")
        diverged = loss_divergence(history)
        if diverged:
            self._fine_tune["diverged"] = {**diverged, "lr": lr}
        return history


# How far above its first epoch's loss a fine-tune's epoch loss may rise before it counts as diverged. Over the
# 227 CNN fine-tunes saved by the CIFAR-10 benches the rise is at most 1.36x (a one-cycle schedule's warm-up);
# the ViT's fine-tunes at lr 0.01, which wreck the model (FT on Blended: ACC 75.9 -> 38.9), rise 1.8-11x.
DIVERGENCE_FACTOR = 1.5


def loss_divergence(history: list[dict], factor: float = DIVERGENCE_FACTOR) -> dict | None:
    """The epoch where a fine-tune's training loss rose highest above its first epoch's, when it rose more than
    ``factor`` times: ``{"first_loss", "peak_loss", "peak_epoch", "last_loss"}``; None otherwise (or when the first
    loss is not positive: a loss with a negative term, FST's, has no such reference). Trigger-free: it reads the
    fine-tune's own loss on the defender's clean images. A diverged fine-tune relearns the model from the clean
    subset, which can remove a backdoor for a reason that has nothing to do with the defense."""
    losses = [float(h["loss"]) for h in history if "loss" in h]
    if len(losses) < 2 or not losses[0] > 0:
        return None
    peak = max(range(1, len(losses)), key=losses.__getitem__)
    if losses[peak] <= factor * losses[0]:
        return None
    return {"first_loss": losses[0], "peak_loss": losses[peak], "peak_epoch": peak + 1, "last_loss": losses[-1]}
