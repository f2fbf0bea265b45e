"""FMT's per-map tests as a library: each feature map of a model probed on its own (a signed input step, a small
universal patch, a smooth warp or additive field) or stimulated directly, and what the model's predictions then
say (each map's pull towards each class, the suspected target). Uses the model and clean images only.

- :mod:`.layers`: the layers whose maps are tested, a layer's output, the BatchNorm that reads a conv;
- :mod:`.perturbations`: the changes a probe makes to images, and the candidate triggers it leaves;
- :mod:`.map_test`: :func:`probe_maps`, testing every map, and what it measured (:class:`MapTest`);
- :mod:`.batched` and :mod:`.reference`: its fast implementation and the readable per-map loop it is checked against;
- :mod:`.pull`: from a map test to each map's pull towards each class and the suspected target;
- :mod:`.stimulation`: the stimulation test (each map set directly to a high value);
- :mod:`.signs`: the trigger-free signs of a backdoor these yield, and the thresholds that fire them.

Defenses, the scan, ``mapprune diagnose`` and the adaptive attacks build on these; this package imports none of them.
"""

from .layers import (
    MapLayer,
    channel_dim,
    consumer_signs,
    conv_layers,
    feature_map,
    following_batchnorms,
    forward_hooks,
    layer_output,
    map_layers,
    num_maps,
    recorded_outputs,
)
from .map_test import IMPLEMENTATIONS, OBJECTIVES, MapTest, probe_feature_maps, probe_maps, score_feature_maps
from .perturbations import (
    FIELD_NULLS,
    FIELDS,
    CandidateSet,
    Field,
    Patches,
    Shifts,
    Warps,
    default_patch,
    find_patches,
    flow_warp,
    null_images,
    patch_step,
    random_start,
    smooth_shift,
)
from .pull import SCORERS, class_pull, estimate_target, layer_z, robust_z, suspicion, target_from_pull
from .reference import adversarial_for_map
from .signs import PULL_THRESHOLD, fired_signs
from .stimulation import ANOMALY_THRESHOLD, Stimulation, stimulate_maps

__all__ = [
    "ANOMALY_THRESHOLD", "FIELD_NULLS", "FIELDS", "IMPLEMENTATIONS", "OBJECTIVES", "PULL_THRESHOLD", "SCORERS",
    "adversarial_for_map", "CandidateSet", "channel_dim", "class_pull", "consumer_signs", "conv_layers",
    "default_patch", "estimate_target", "feature_map", "Field", "find_patches", "fired_signs", "flow_warp",
    "following_batchnorms", "forward_hooks", "layer_output", "layer_z", "map_layers", "MapLayer", "MapTest",
    "null_images", "num_maps", "patch_step", "Patches", "probe_feature_maps", "probe_maps", "random_start",
    "recorded_outputs", "robust_z", "score_feature_maps", "Shifts", "smooth_shift", "stimulate_maps", "Stimulation",
    "suspicion", "target_from_pull", "Warps",
]
