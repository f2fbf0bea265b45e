"""Feature Map Testing (FMT), "Adversarial Feature Map Pruning for Backdoor" (ICLR 2024).

Test every feature map (:mod:`mapprune.probes`: every conv channel, and on a transformer every Linear output
channel but the head's), select the maps whose per-map attack wrecks accuracy (``selection.py``), prune them
(``pruning.py``), fine-tune on the clean subset with the one training loop.
``docs/fmt.md`` is the specification; the released code's bugs (double normalisation, scores applied in the
wrong layer order, BatchNorm in train mode) are not repeated: one normalisation inside the model, everything
keyed by module name, eval mode while testing.
"""

import copy
import time

import torch

from ...device import amp_dtype
from ...errors import MapPruneError
from ...metrics import rejected_classes
from ...probes import (
    FIELD_NULLS,
    CandidateSet,
    Field,
    MapTest,
    Patches,
    class_pull,
    estimate_target,
    fired_signs,
    probe_maps,
    stimulate_maps,
    target_from_pull,
)
from ..base import CleanData, FineTuning, held_out_accuracy, most_aggressive, pick_images
from ..pruning import prune
from ..selection import select
from ..stamping import stamping, stamping_each
from .config import CONFIGS, EXPERT, FINETUNE_EXPERT, FINETUNES, FMT_RECIPES, OPTIONS, PAPER, RECOMMENDED, FMTConfig

__all__ = ["CONFIGS", "EXPERT", "FINETUNES", "FMT", "FMT_RECIPES", "OPTIONS", "PAPER", "RECOMMENDED", "FMTConfig"]

OBJECTIVES = ("mse", "patch", "warp", "smooth")  # FMT's probes (mapprune.probes also has "excite", for diagnose)
SELECTIONS = ("rank", "global")  # the paper's first arXiv rule, "outlier", is selection.select_outlier
PRECISIONS = ("auto", "fp32", "bf16")  # the testing phase's; auto = bf16 on a GPU that has it, else fp32
FIELD_SIZES = {"warp": "warp_px", "smooth": "smooth_linf"}  # the field probes and the option that sizes each


def random_candidates(found, image_hw: tuple[int, int], seed: int):
    """The control for unlearning (docs/fmt.md: random warps 4.42 against 2.61 ASR on WaNet, random smooth fields
    31.88 against 2.23 on LF): as many patches (and warps) of the same sizes as FMT found, at random positions with
    random 0/1 pixels (random +-1 control points for warps)."""
    g = torch.Generator().manual_seed(seed + 7919)
    if isinstance(found, CandidateSet):
        return CandidateSet([random_candidates(p, image_hw, seed + i) for i, p in enumerate(found.parts)])
    if isinstance(found, Field):
        return type(found)(torch.randint(0, 2, found.phi.shape, generator=g).float() * 2 - 1, found.pixels)
    k, s = len(found), found.window.shape[-1]
    pos = torch.stack([torch.randint(0, image_hw[0] - s + 1, (k,), generator=g),
                       torch.randint(0, image_hw[1] - s + 1, (k,), generator=g)], 1)
    return Patches(pos, torch.randint(0, 2, found.window.shape, generator=g).float())


class FMT(FineTuning):
    """Feature Map Testing. Its recipe is :class:`~mapprune.defenses.fmt.config.FMTConfig`: ``recipe="paper"``
    (:data:`PAPER`: n=32 images, alpha 0.02, eps 0.06, rank selection of floor(C/64) maps per layer, fine-tune 10
    epochs at lr 0.01, batch 256) or ``recipe="recommended"`` (:data:`RECOMMENDED`, the default). Any option given
    explicitly overrides its recipe's value; so does any expert setting (``EXPERT``: ``stimulate``,
    ``field_images``, ``detect_only``...), which :meth:`params` records only where it differs from the recipe.

    Example::

        result = FMT().repair(model, clean_images, clean_labels)
        result.model      # the repaired model
        result.pruned     # {layer name: [channels]} (conv, or Linear on a transformer)
        result.scores     # {layer name: per-channel accuracy under attack}
    """

    name = "fmt"
    # the stimulation test is reported; the repair reads it only through the gate (an option, off by default)
    report_only = ("stimulate", "stimulate_images")
    dataset_defaults = {"cifar100": {"alpha": 0.03}, "gtsrb": {"alpha": 0.03}}  # the paper's configurations
    score_label = "accuracy under per-map attack"

    def __init__(self, *, recipe: str = "recommended", n_images: int | None = None, alpha: float | None = None,
                 eps: float | None = None, objective: str | None = None, selection: str | None = None,
                 fraction: float | None = None, budget: int | str | None = None, mask: bool | None = None,
                 unlearn: float | None = None, warp_px: float | None = None, smooth_linf: float | None = None,
                 balanced: bool | None = None, unlearn_maps: int | None = None, unlearn_each: bool | None = None,
                 field_images: int | None = None, stimulate: float | None = None, stimulate_images: int | None = None,
                 min_per_layer: int | None = None, max_drop: float | None = None, precision: str | None = None,
                 batch_images: int | None = None, field_null: str | None = None, detect_only: bool | None = None,
                 gate: bool | None = None, **kw):
        # None: the recipe's value (config.py). The first line's options are what a user tunes; the rest are EXPERT
        # settings, recorded in params() only where they differ from the recipe.
        given = {k: v for k, v in locals().items() if k in OPTIONS + EXPERT}
        super().__init__(recipe=recipe, **kw)
        own = FMT_RECIPES[recipe]
        for k in OPTIONS + EXPERT:
            v = given.get(k)
            setattr(self, k, own[k] if v is None else v)
        if self.selection not in SELECTIONS:
            raise MapPruneError(f"unknown selection rule {self.selection!r}; valid: {', '.join(SELECTIONS)}")
        if self.objective not in OBJECTIVES:
            raise MapPruneError(f"unknown objective {self.objective!r}; valid: {', '.join(OBJECTIVES)}")
        if self.n_images < 1:
            raise MapPruneError(f"n_images must be >= 1, got {self.n_images}")
        if self.eps < 0 or self.alpha < 0:
            raise MapPruneError(f"eps and alpha must be >= 0, got eps={self.eps}, alpha={self.alpha}")
        if self.objective == "patch" and eps not in (None, own["eps"]):
            # A silently ignored eps would make a sweep over it look like a finding ("eps does not matter"). The
            # recipe's own value is let through: result.json records it, and its params rebuild the defense.
            raise MapPruneError("eps is the step of the mse, warp and smooth objectives; the patch objective "
                                "(the recommended recipe's) stamps a 0/1 patch and has no step size. Drop eps, or "
                                "set the field probes' sizes (warp_px, smooth_linf), or choose "
                                "objective='mse' (the paper's)")
        if not 0 <= self.unlearn < 1:
            raise MapPruneError(f"unlearn is the share of each fine-tune batch stamped, in [0, 1), got {self.unlearn}")
        if self.unlearn > 0 and self.objective not in ("patch", "warp"):
            raise MapPruneError("unlearn stamps the candidate triggers of the patch or warp objective; use one of "
                                "those objectives")
        for flag in ("unlearn_each", "balanced", "mask", "detect_only", "gate"):
            if not isinstance(getattr(self, flag), bool):
                raise MapPruneError(f"{flag} is true or false, got {getattr(self, flag)!r}")
        if self.unlearn_maps < 1:
            raise MapPruneError(f"unlearn_maps must be >= 1, got {self.unlearn_maps}")
        if self.warp_px < 0:
            raise MapPruneError(f"warp_px is a displacement in pixels, >= 0; got {self.warp_px}")
        if not 0 <= self.smooth_linf <= 1:
            raise MapPruneError(f"smooth_linf is an L-inf amplitude in [0, 1], got {self.smooth_linf}")
        if not isinstance(self.field_images, int) or isinstance(self.field_images, bool) or self.field_images < 0:
            raise MapPruneError("field_images is how many of the n_images judge the warp and smooth candidates' "
                                f"probes (0: all of them), an integer >= 0; got {self.field_images!r}")
        if self.stimulate < 0 or self.stimulate_images < 1:
            raise MapPruneError("stimulate is a level in clean standard deviations (0: no stimulation test) and "
                                f"stimulate_images >= 1; got {self.stimulate} and {self.stimulate_images}")
        if self.gate and self.stimulate == 0:
            raise MapPruneError("gate reads the stimulation test among its signs; keep stimulate > 0 (its default)")
        if self.budget == "auto":
            if self.selection != "global":
                raise MapPruneError("budget='auto' chooses how many maps the global selection prunes; use "
                                    "selection='global'")
            if self.held_out == 0:
                raise MapPruneError("budget='auto' stops on held-out clean accuracy; use held_out > 0")
        elif self.budget is not None and (isinstance(self.budget, str) or self.budget < 0):
            raise MapPruneError(f"budget must be a number of maps >= 0 or 'auto', got {self.budget!r}")
        if not 0 <= self.max_drop < 1:
            raise MapPruneError(f"max_drop is a relative accuracy drop in [0, 1), got {self.max_drop}")
        if self.precision not in PRECISIONS:
            raise MapPruneError(f"unknown precision {self.precision!r}; valid: {', '.join(PRECISIONS)}")
        if self.field_null not in FIELD_NULLS:
            raise MapPruneError(f"unknown field_null {self.field_null!r}; valid: {', '.join(FIELD_NULLS)}")
        if not 0 < self.fraction < 1:
            raise MapPruneError(f"rank fraction must be in (0, 1), got {self.fraction}")

    @classmethod
    def option_names(cls) -> list[str]:
        """FMT's options (at most 24, the fine-tune's included); the EXPERT settings its signature also takes are
        not options (the command line's --opt and bench grids refuse them; from Python, ``FMT(field_images=0)``)."""
        return [k for k in super().option_names() if k not in EXPERT + FINETUNE_EXPERT]

    def params(self) -> dict:
        """The options (at most 24), and each expert setting whose value differs from the recipe's."""
        own = {**FINETUNES[self.recipe], **FMT_RECIPES[self.recipe]}
        return {**{k: getattr(self, k) for k in self.option_names() if hasattr(self, k)},
                **{k: getattr(self, k) for k in EXPERT + FINETUNE_EXPERT if getattr(self, k) != own[k]}}

    @property
    def config(self) -> FMTConfig:
        """The settings this FMT runs with, as one :class:`FMTConfig`."""
        return FMTConfig(**{f: getattr(self, f) for f in FMTConfig.__dataclass_fields__})

    @property
    def unlearn_warp(self) -> float:  # the warp probe's size under its name in mapprune.detect.scan
        return self.warp_px

    @property
    def unlearn_smooth(self) -> float:  # the smooth probe's size under its name in mapprune.detect.scan
        return self.smooth_linf

    @classmethod
    def recipe_defaults(cls, recipe: str | None) -> dict:
        recipe = recipe or "recommended"
        return {**FINETUNES.get(recipe, {}), **FMT_RECIPES.get(recipe, {})}

    def test_images(self, x: torch.Tensor, y: torch.Tensor):
        """The n seeded test images drawn from the clean subset."""
        return pick_images(x, y, self.n_images, self.seed, self.balanced)

    def probe(self, model, x, y, objective: str | None = None, eps: float | None = None) -> MapTest:
        """Tests every map (``objective``/``eps`` default to the defense's) under the chosen precision."""
        objective = objective or self.objective
        return self.probes(model, x, y, {objective: self.eps if eps is None else eps})[objective]

    def probes(self, model, x, y, probes: dict[str, float], judged: dict[str, int] | None = None
               ) -> dict[str, MapTest]:
        """Several probes of every map in one pass (:func:`~mapprune.probes.probe_maps`) under the chosen precision;
        ``judged``: probe_maps's ``judged_images``."""
        xt, yt = self.test_images(x, y)
        device = next(model.parameters()).device
        bf16 = self.precision == "bf16" or self.precision == "auto" and device.type == "cuda" \
            and amp_dtype(device) == torch.bfloat16
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            return probe_maps(model, xt, yt, probes, alpha=self.alpha, seed=self.seed,
                              batch_images=self.batch_images,
                              keep_probs=True, judged_images=judged, progress=self.progress,
                              field_null=self.field_null)

    def stimulation(self, model, x, y) -> dict:
        """The stimulation test (:mod:`mapprune.probes.stimulation`) on ``stimulate_images`` class-balanced images of the clean
        subset: its suspected target, anomaly index and per-class pull. Detection only: the repair does not use it.
        """
        xs, ys = pick_images(x, y, self.stimulate_images, self.seed, balanced=True)
        found = stimulate_maps(model, xs, ys, level=self.stimulate, batch_images=self.batch_images,
                               progress=self.progress)
        return {**target_from_pull(found.flat()), "level": self.stimulate, "n_images": len(ys)}

    def adaptive_budget(self, model, ranked: dict, data: CleanData, base: int) -> tuple[dict, list]:
        """``budget='auto'``: the most maps, in the global order, whose pruning (before the fine-tune) keeps the
        held-out clean accuracy within ``max_drop`` (relative) of the unpruned model's; candidates from a quarter
        to four times the rank rule's count ``base``."""
        xs, ys = data.select
        example = xs[:1].to(next(model.parameters()).device).float() / 255
        acc0 = held_out_accuracy(model, xs, ys)

        def acc_of(k):
            pruned_copy = copy.deepcopy(model)
            prune(pruned_copy, select("global", ranked, budget=k), example)
            return held_out_accuracy(pruned_copy, xs, ys)

        candidates = sorted({max(1, round(base * f)) for f in (0.25, 0.5, 0.75, 1, 1.5, 2, 3, 4)})
        k, tried = most_aggressive(candidates, acc_of, acc0, self.max_drop)
        sweep = [[0, round(acc0, 6)]] + [[kk, round(a, 6)] for kk, a in tried]
        return select("global", ranked, budget=k or 0), sweep

    def score(self, model, x, y) -> dict[str, torch.Tensor]:
        """The paper's per-map accuracy scores."""
        return self.probe(model, x, y).acc

    def rank_count(self, scores: dict[str, torch.Tensor]) -> int:
        """The rank rule's count: 25 maps of a width-16 PreActResNet18, 75 at width 64."""
        rank = select("rank", scores, fraction=self.fraction, min_per_layer=self.min_per_layer)
        return sum(len(v) for v in rank.values())

    def choose(self, scores: dict[str, torch.Tensor]) -> dict[str, list[int]]:
        """Maps to prune from per-map scores where low = suspicious."""
        if self.selection == "rank":
            return select("rank", scores, fraction=self.fraction, min_per_layer=self.min_per_layer)
        return select("global", scores, budget=self.rank_count(scores) if self.budget in (None, "auto")
                      else self.budget)

    def candidates(self, test: MapTest, target: int) -> tuple[Patches | Field, list[str]]:
        """The ``unlearn_maps`` patches that pull hardest towards the suspected target (FMT's candidate
        triggers) and the maps they came from, as "layer[channel]"."""
        names = [f"{layer}[{c}]" for layer, acc in test.acc.items() for c in range(len(acc))]
        parts = list(test.candidates.values())
        patches = type(parts[0]).cat(parts)
        top = class_pull(test)[:, target].topk(min(self.unlearn_maps, len(names))).indices
        return patches.select(top), [names[i] for i in top.tolist()]

    def unlearning(self, patches: Patches | Field | CandidateSet):
        """The fine-tune's batch transform: a share ``unlearn`` of each batch gets one of the candidate triggers
        stamped on, keeping its true label (FMT's own candidate poison samples, unlearned). With ``unlearn_each``,
        each probe's candidates get their own share ``unlearn`` (:func:`stamping_each`)."""
        if self.unlearn_each:
            return stamping_each(patches.parts if isinstance(patches, CandidateSet) else [patches], self.unlearn)
        return stamping(patches, self.unlearn)

    def gate_signs(self, model, tests: dict[str, MapTest], stimulated: dict | None, x, y) -> dict:
        """The gate's evidence (:mod:`mapprune.probes.signs`): each probe's pull, the classes the model rejects on
        the clean subset, the stimulation test's anomaly index; ``open`` when any sign fires."""
        pulls = {o: round(max(estimate_target(t)["class_pull"]), 4) for o, t in tests.items()}
        rejected = rejected_classes(self.incoming_class_accuracy(model, x, y))
        anomaly = stimulated["anomaly_index"] if stimulated else None
        signs = fired_signs(pulls, rejected, anomaly)
        return {"open": bool(signs), "signs": signs, "pulls": pulls, "rejected_classes": rejected,
                "stimulation_anomaly": None if anomaly is None else round(anomaly, 4)}

    def _repair(self, model, data: CleanData, device):
        x, y = data.x, data.y
        timings = {}
        t0 = time.perf_counter()
        # The fields that give unlearning candidates are probed in the same pass as the patches (one backward).
        fields = {o: getattr(self, size) for o, size in FIELD_SIZES.items()
                  if getattr(self, size) > 0 and self.unlearn > 0 and self.objective == "patch"}
        # The field probes only choose unlearning candidates: judging their steps on fewer images (field_images)
        # keeps the testing phase within 2x the paper's one probe (each probe's evaluation forward costs about what
        # the shared backward does).
        judged = {o: self.field_images for o in fields if self.field_images}
        tests = self.probes(model, x, y, {self.objective: self.eps, **fields}, judged)
        test = tests[self.objective]
        timings["test"] = time.perf_counter() - t0
        extra = {"recipe": self.recipe}
        if self.stimulate > 0:
            t0 = time.perf_counter()
            extra["stimulated_target"] = self.stimulation(model, x, y)
            timings["stimulate"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        target = estimate_target(test)
        ranked = test.acc
        pruned = self.choose(ranked)
        extra["suspected_target"] = target
        opened = True
        if self.gate:
            extra["gate"] = self.gate_signs(model, tests, extra.get("stimulated_target"), x, y)
            opened = extra["gate"]["open"]
        if not opened:
            pruned = {name: [] for name in ranked}
        elif self.budget == "auto":
            pruned, extra["budget_sweep"] = self.adaptive_budget(model, ranked, data, self.rank_count(ranked))
        timings["select"] = time.perf_counter() - t0
        transform = None
        if self.unlearn > 0 and opened:
            patches, maps = self.candidates(test, target["target"])
            extra["unlearning"] = {"share": self.unlearn, "maps": maps}
            if isinstance(patches, Patches):
                extra["unlearning"]["patch_positions"] = patches.pos.tolist()
                parts = [patches]
                for objective, size in fields.items():
                    # Each field probe's candidates: the maps that pull hardest to the class it suspects, for
                    # triggers that move pixels (warp) or change every pixel a little (smooth), which a patch
                    # cannot make.
                    field_target = estimate_target(tests[objective])
                    found, field_maps = self.candidates(tests[objective], field_target["target"])
                    parts.append(found)
                    extra["unlearning"].update({f"{objective}_size": size, f"{objective}_maps": field_maps,
                                                f"{objective}_suspected_target": field_target})
                if len(parts) > 1:
                    patches = CandidateSet(parts)
            transform = self.unlearning(patches)
        result = self.result(model, timings, pruned=pruned, scores=test.acc, extra=extra)
        if self.detect_only:
            result.original = model
            return result
        result.original = copy.deepcopy(model).cpu()
        teacher = copy.deepcopy(model) if self.distill > 0 else None
        t0 = time.perf_counter()
        mask = prune(model, pruned, x[:1].to(device).float() / 255)
        timings["prune"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        result.history = self.finetune(model, x, y, after_step=mask if self.mask else None, device=device,
                                       teacher=teacher, transform=transform,
                                       incoming=teacher if teacher is not None else result.original)
        timings["finetune"] = time.perf_counter() - t0
        return result
