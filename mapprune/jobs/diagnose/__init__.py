"""``mapprune diagnose RUN``: how well do feature-map scorers find the maps that really carry the backdoor?

An evaluation tool, never part of a defense: it uses the run's real trigger and its test split.

- Ground truth per feature map (every Conv2d channel): the **trigger response** (shift of the map's spatial
  mean and max between triggered and clean test images, in units of the clean spread) and the **causal effect**
  (ASR and ACC change when that one map is pruned the way FMT prunes: filter and consumer-BN gamma zeroed).
- **Scorers** under test (FMT's paper score and the target-concentration score, for each testing setting asked
  for) and a **random** ordering: AUROC against the ground-truth backdoor maps, precision and recall at the
  pruning budget, the seed-to-seed rank correlation of the scores.
- **Cumulative pruning curves** ASR(k), ACC(k) without fine-tuning, for every ordering including the oracle one.
- **Controls**: oracle-k and random-k pruning followed by the defenses' fine-tune (what any scorer can reach at
  this budget and fine-tune), and, run on a clean model, whether the scores see a backdoor at all.

Writes ``RUN/diagnose/diagnose.json``, ``curves.png`` and ``scores_vs_truth.png``; the ground truth is cached
in ``RUN/diagnose/ground_truth.safetensors`` so new scorers are cheap to add.

The package: ``truth`` (the ground truth and the test images it is measured on), ``orderings`` (metrics and
pruning curves), ``diagnosis`` (the diagnosis and the run-folder job), ``figures`` (its two figures).
"""

from .diagnosis import DEFAULT_SETTINGS, SETTING_KEYS, diagnose, diagnose_run, finetune_controls
from .figures import save_diagnose_figures
from .orderings import as_pruned, auroc, ordering, pruning_curve, scorer_metrics, spearman
from .truth import (
    SingleMapPruner,
    causal_effect,
    evaluation_images,
    flat_index,
    flatten,
    ground_truth,
    map_statistics,
    rates,
    trigger_response,
)

__all__ = ["DEFAULT_SETTINGS", "SETTING_KEYS", "SingleMapPruner", "as_pruned", "auroc", "causal_effect", "diagnose",
           "diagnose_run", "evaluation_images", "finetune_controls", "flat_index", "flatten", "ground_truth",
           "map_statistics", "ordering", "pruning_curve", "rates", "save_diagnose_figures", "scorer_metrics",
           "spearman", "trigger_response"]
