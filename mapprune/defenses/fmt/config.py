"""FMT's whole recipe in one place: :class:`FMTConfig`, and its instances side by side, :data:`PAPER` (the
published algorithm), :data:`RECOMMENDED` (what the measurements in docs/fmt.md chose; the default) and
:data:`DURABLE` (the recommended recipe changed so its repair of WaNet holds under the retuning attack).

Each field says what it does and what was measured for it (CPU-preset CIFAR-10 PreActResNet18 width 16, ACC / ASR /
RA in %, docs/fmt.md "What the recommended recipe adds" and docs/results.md). The fields in :data:`OPTIONS` are
FMT's options (``FMT(**options)``, ``mapprune defend fmt --help``); the others are :data:`EXPERT` settings, taken by
keyword too but recorded in ``FMT().params()`` only where they differ from the recipe's value. The fine-tune's
fields are shared with FT, FP and NC (:data:`FINETUNES`).
"""

from dataclasses import asdict, dataclass, fields, replace


@dataclass(frozen=True)
class FMTConfig:
    """One FMT recipe: the testing phase, the selection, the unlearning and the fine-tune."""

    # --- testing: one probe per feature map -------------------------------------------------------------------
    # which probe tests each map: "mse" (the paper's: one signed step of eps from the random start) or "patch" (one
    # universal 5x5 0/1 patch per map where its gradient is largest: BadNets 98.4 -> 2.0 ASR with no fine-tune,
    # where the paper's probe ranks the causal maps at AUROC 0.55 / 0.50 / 0.42 on BadNets / Blended / WaNet);
    # "warp" and "smooth" test with the field probes alone
    objective: str
    # test images drawn (seeded) from the clean subset; the paper's 32, kept by both recipes
    n_images: int = 32
    # random-start size (+-alpha per pixel) of the mse probe; the paper's 0.02 (0.03 on CIFAR-100 and GTSRB:
    # FMT.dataset_defaults)
    alpha: float = 0.02
    # signed step of the mse, warp and smooth probes; the paper's 0.06; the patch probe has no step and refuses any
    # other value
    eps: float = 0.06
    # --- selection: which maps are pruned ----------------------------------------------------------------------
    # "rank": floor(C * fraction) per layer (the paper's, 25 maps at width 16); "global": the same count ranked over
    # all layers by within-layer robust z-score, only maps below their layer's median (SSBA seed 1: 81.42 -> 85.09
    # ACC against breaking ties in layer order)
    selection: str = "global"
    # share of each layer's maps the rank rule prunes, which also sets the global rule's count; the paper's 1/64
    fraction: float = 1 / 64
    # maps the global selection prunes: None (the rank rule's count), a number, or "auto" (the most that keep
    # held-out clean accuracy within max_drop); not measured on CIFAR-10
    budget: int | str | None = None
    # keep pruned maps at zero while fine-tuning (the paper lets them regrow): Blended, paper recipe, 29.76 -> 19.70
    mask: bool = True
    # --- unlearning: FMT's own candidate triggers stamped on the fine-tune's images, true labels kept ---------
    # share of each fine-tune batch stamped (0: none, the paper's); 0.2: BadNets over seeds 0 / 1 / 2 from
    # 2.67 / 83.06 / 13.79 to 1.69 / 2.27 / 1.89 ASR
    unlearn: float = 0.2
    # displacement in pixels of the warp probe's candidates (0: none); 1 pixel: WaNet 90.32 -> 2.61 ASR (random warps
    # of the same size 4.42)
    warp_px: float = 1.0
    # L-inf amplitude of the smooth probe's additive candidates (0: none); 0.06: Low Frequency 70.56 -> 2.23 ASR
    # (random fields of the same size 31.88)
    smooth_linf: float = 0.06
    # score and report the suspicious maps and the suspected target, change nothing (an option)
    detect_only: bool = False
    # prune and unlearn only when the testing phase finds a sign of a backdoor (a probe's pull, a rejected class,
    # the stimulation test: mapprune.probes.signs, the fixed-threshold scan's signs); with none, the fine-tune
    # alone. Width-8 population, closed gates: clean models lose -0.20 / 0.09 / 0.21 points instead of 1.25 / 1.01 /
    # 1.09, but a blend the signs miss keeps 98.28% ASR (ungated 1.78%): FMT removes backdoors it cannot detect, so
    # the gate is off in every recipe (docs/fmt.md, "Options outside the recipes")
    gate: bool = False
    # --- the fine-tune (shared with FT, FP and NC) -------------------------------------------------------------
    # epochs; the paper's 10; 15 with the one-cycle schedule
    epochs: int = 15
    # peak learning rate; 0.01 keeps 0.3-1.2 points more clean accuracy than 0.02 and removes the backdoors as well
    lr: float = 0.01
    # batch size; the paper's 256; 128
    batch_size: int = 128
    # SGD weight decay; the paper's 0; 5e-4
    weight_decay: float = 5e-4
    # the cosine schedule's floor (the paper's 1e-4); 0 with one-cycle; an expert setting of FMT (FT's option)
    min_lr: float = 0.0
    # "cosine" (the paper's) or "onecycle": fine-tuning alone on BadNets, the paper's leaves 46.2 ASR, one-cycle to
    # 0.02 2.80
    schedule: str = "onecycle"
    # Nesterov momentum; the paper's off; an expert setting of FMT (FT's option)
    nesterov: bool = True
    # weight of the KL divergence to the incoming model's softened predictions (0: none, the paper's); 1.0: Blended
    # 82.39 -> 84.22 ACC at the same ASR (2 and 0.5 tried: 81.36 and 83.27)
    distill: float = 1.0
    # learning rate when the incoming model rejects a class of the clean subset (0: lr always); 0.02: SIG 32.84 ->
    # 5.17 ASR, its consumed target class learnt again
    relearn_lr: float = 0.02
    # --- expert settings: taken by keyword, recorded only where they differ from the recipe ---------------------
    # draw the test images class-balanced instead of uniformly (the paper's); not kept by either recipe
    balanced: bool = False
    # candidate triggers per probe family: the maps that pull hardest to the suspected target; 8
    unlearn_maps: int = 8
    # (an option) each candidate family (patch, warp, smooth) stamped on its own share of each batch: WaNet seeds 0 / 1 from
    # 5.74 / 8.70 to 1.80 / 3.00 ASR, about 0.8 point of clean accuracy
    unlearn_each: bool = True
    # test images that judge the warp and smooth probes (0: all n_images); 16: the testing phase costs 1.59x the
    # paper's instead of 1.98x, seven of nine mean ASRs within 0.15 points
    field_images: int = 16
    # level (clean standard deviations) of the stimulation test, detection only (0: none); 4.0: anomaly index 1.81 on
    # the clean model, 6.25 on Blended, 8.38 on WaNet, both targets named
    stimulate: float = 4.0
    # class-balanced clean images of the stimulation test
    stimulate_images: int = 30
    # maps the rank rule prunes per layer at least
    min_per_layer: int = 1
    # budget="auto": the largest relative drop of held-out clean accuracy allowed
    max_drop: float = 0.1
    # the testing phase's precision: "auto" (bf16 on a GPU that has it), "fp32" or "bf16" (digits: the same maps as
    # fp32 on an AVX-512 CPU, 22 of 24 on an AVX2 one)
    precision: str = "auto"
    # images per batched backward of the testing phase (memory, not results)
    batch_images: int = 1024
    # the field probes' pull measured against +-eps noise ("sign") or random fields of their kind ("field": ViT
    # Blended 75.51 -> 43.64 ASR, CNN WaNet 2.70 -> 3.94); "sign"
    field_null: str = "sign"

    def as_dict(self) -> dict:
        return asdict(self)


PAPER = FMTConfig(objective="mse", selection="rank", mask=False, unlearn=0.0, warp_px=0.0, smooth_linf=0.0,
                  epochs=10, batch_size=256, weight_decay=0.0, min_lr=1e-4, schedule="cosine", nesterov=False,
                  distill=0.0, relearn_lr=0.0, unlearn_each=False, field_images=0, stimulate=0.0)
RECOMMENDED = FMTConfig(objective="patch")
# The recommended recipe's repair of WaNet only hides the backdoor: retuned on 1,000 images of which 5 carry the
# trigger (`mapprune relapse`, seed 0), it goes from 2.70 back to 65.62% ASR (the clean control 1.84%). The
# distillation to the incoming model keeps the repair close to the backdoored one: without it, 28.47%; without it
# and at lr 0.02, 1.89 / 6.72 / 2.46% over retuning seeds 0 / 1 / 2, BadNets 1.51%, Blended 2.49%, at 1.3-1.8 points
# of ACC (WaNet 81.82 against 83.63); lr 0.02 with the distillation 13.91%; more unlearning instead (0.4, lr 0.01)
# 70.50%. docs/fmt.md, "A repair that holds".
DURABLE = replace(RECOMMENDED, distill=0.0, lr=0.02)
CONFIGS: dict[str, FMTConfig] = {"paper": PAPER, "recommended": RECOMMENDED, "durable": DURABLE}

# The fine-tune's fields (FineTuning's options, shared with FT, FP and NC).
FINETUNE_FIELDS = ("epochs", "lr", "batch_size", "weight_decay", "min_lr", "schedule", "nesterov", "distill",
                   "relearn_lr")
# FMT's own options, what a user tunes; with the fine-tune's and recipe, held_out, hflip, seed: FMT().params().
OPTIONS = ("n_images", "alpha", "eps", "objective", "selection", "fraction", "budget", "mask", "unlearn", "warp_px",
           "smooth_linf", "unlearn_each", "detect_only", "gate")
EXPERT = tuple(f.name for f in fields(FMTConfig) if f.name not in OPTIONS + FINETUNE_FIELDS)
# Fine-tune fields that are not FMT's options (FT's keeps them): they come with the recipe's schedule.
FINETUNE_EXPERT = ("min_lr", "nesterov")

FINETUNES: dict[str, dict] = {name: {k: getattr(c, k) for k in FINETUNE_FIELDS} for name, c in CONFIGS.items()}
# FMT's own values per recipe (options and expert settings); read when an FMT is made, so a test may patch them.
FMT_RECIPES: dict[str, dict] = {name: {k: v for k, v in c.as_dict().items() if k not in FINETUNE_FIELDS}
                                for name, c in CONFIGS.items()}
