"""Testing every feature map: one signed input step per map, then the model's predictions on the stepped images.

For every tested layer l (every Conv2d, and every nn.Linear but the classifier head: :func:`~.layers.map_layers`)
and output channel c: starting from x0 = clip(x + alpha * s, 0, 1) (one random sign draw shared by all maps),
take one signed step of size eps that pushes channel c of layer l away from its clean value, and record the
fraction of the n images the model still classifies correctly. A map is the channel over everything else in the
layer's output: a conv's ``out[:, c]`` (all positions), a Linear's ``out[..., c]`` (all tokens); "the mean
of a map" is its mean over the images and those positions or tokens.

Two implementations give the same scores: ``reference``, the plain per-map loop (:mod:`.reference`), and
``fast``, the batched one (:mod:`.batched`).
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import MapPruneError
from ..images import as_unit
from .batched import score_batched
from .layers import consumer_signs, map_layers, num_maps
from .perturbations import FIELD_NULLS, Field, Patches, null_images, random_start
from .reference import score_reference

OBJECTIVES = ("mse", "excite", "patch", "warp", "smooth")


@dataclass
class MapTest:
    """What testing every feature map measured.

    ``acc``: {layer name: (C,) accuracy of the n stepped images} (the paper's score; low = suspicious).
    ``probs``: {layer name: (C, n, K) softmax of the model on each map's n stepped images}, kept only when asked
    for (``keep_probs``): where the perturbed predictions go is what the target-concentration scorer reads.
    ``null_probs``: (n, K) softmax on the same images stepped in a random sign direction of the same size, the
    null against which a map's pull towards a class is measured. ``labels``: the n true labels.
    ``candidates``: with the ``patch``, ``warp`` and ``smooth`` objectives, {layer name: each map's universal
    patch or field} (FMT's candidate triggers: they can be stamped on any image).
    """

    acc: dict[str, torch.Tensor]
    labels: torch.Tensor
    probs: dict[str, torch.Tensor] = field(default_factory=dict)
    null_probs: torch.Tensor | None = None
    candidates: dict[str, Patches | Field] = field(default_factory=dict)


IMPLEMENTATIONS = ("fast", "reference")


def score_feature_maps(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, **kw) -> dict[str, torch.Tensor]:
    """Per-map accuracy under per-map attack, ``{layer module name: tensor of per-channel accuracies}``: the
    paper's score. Takes :func:`probe_feature_maps`'s arguments."""
    return probe_feature_maps(model, images, labels, **kw).acc


def probe_feature_maps(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, eps: float = 0.06,
                       objective: str = "mse", **kw) -> MapTest:
    """Tests every feature map: one signed input step per map, then the model's predictions on the stepped images.

    ``images``: (n, C, H, W) uint8 or float in [0, 1], on the model's device or CPU; ``labels``: true labels.
    ``objective``: ``mse`` (the paper's: push the map away from its clean value), ``excite`` (push the map up
    as its consumer sees it), ``patch`` (excite it through one small universal patch; see :func:`~.perturbations.patch_step`;
    ``eps`` does not apply), ``warp`` (excite it through one smooth universal warp of ``eps`` pixels) or
    ``smooth`` (excite it through one smooth universal additive change of L-inf size ``eps``). The other
    keyword arguments are :func:`probe_maps`'s.
    """
    return probe_maps(model, images, labels, {objective: eps}, **kw)[objective]


def probe_maps(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    probes: dict[str, float],
    *,
    alpha: float = 0.02,
    seed: int = 0,
    implementation: str = "fast",
    layers: list[str] | None = None,
    batch_images: int = 1024,
    max_maps: int | None = None,
    keep_probs: bool = False,
    judged_images: dict[str, int] | None = None,
    progress: Callable[[int], None] | bool = False,
    field_null: str = "sign",
) -> dict[str, MapTest]:
    """Several probes of every map at once, ``{objective: eps}`` -> ``{objective: MapTest}`` (see
    :func:`probe_feature_maps` for the objectives). The fast implementation shares each layer's forward and
    batched backward between the probes (``mse`` cannot share: it goes alone); the results are each probe's own
    (up to rounding in the fields' gradients). The model is used in eval mode (BatchNorm running statistics) and
    left as it was found. ``layers`` restricts testing to those layer names (default: :func:`~.layers.map_layers`,
    every Conv2d and every nn.Linear but the classifier head; a registry CNN's convs). ``batch_images`` bounds how
    many images one pass of the fast implementation holds (memory scales with it). ``keep_probs`` also keeps every
    map's softmax outputs and a random-direction null (see :class:`MapTest`). ``judged_images``: ``{objective:
    m}`` judges that probe's stepped images on the first m images only (its step still follows all of them): the
    evaluation forward is most of a probe's cost; its MapTest then holds those m images' labels and null.
    ``field_null``: the null of the field probes (warp, smooth): ``sign`` steps every pixel by +-eps (their size
    read as an intensity: a 1-pixel warp's null is then a saturated binary noise image), ``field`` applies a random
    field of the probe's own kind and size to each image (:func:`null_images`).
    """
    if implementation not in IMPLEMENTATIONS:
        raise MapPruneError(f"unknown implementation {implementation!r}; valid: {', '.join(IMPLEMENTATIONS)}")
    if field_null not in FIELD_NULLS:
        raise MapPruneError(f"unknown field_null {field_null!r}; valid: {', '.join(FIELD_NULLS)}")
    if not probes:
        raise MapPruneError("no probe given; give at least one objective")
    for objective, eps in probes.items():
        if objective not in OBJECTIVES:
            raise MapPruneError(f"unknown objective {objective!r}; valid: {', '.join(OBJECTIVES)}")
        if eps < 0:
            raise MapPruneError(f"eps must be >= 0, got eps={eps} for {objective}")
    if "mse" in probes and len(probes) > 1:
        raise MapPruneError("the mse probe has its own cotangent and cannot share a pass; probe it alone")
    if alpha < 0:
        raise MapPruneError(f"alpha must be >= 0, got alpha={alpha}")
    for objective, m in (judged_images or {}).items():
        if objective not in probes:
            raise MapPruneError(f"judged_images names {objective!r}, which is not probed ({', '.join(probes)})")
        if not isinstance(m, int) or m < 1:
            raise MapPruneError(f"judged_images[{objective!r}] is a number of images >= 1, got {m!r}")
    all_layers = map_layers(model)
    if layers is not None:
        unknown = [n for n in layers if n not in all_layers]
        if unknown:
            raise MapPruneError(f"no Conv2d named {unknown[0]!r} (nor a Linear other than the head); testable "
                                f"layers are: {', '.join(all_layers)}")
        all_layers = {n: all_layers[n] for n in layers}
    device = next(model.parameters()).device
    x = as_unit(images, labels).to(device).contiguous(memory_format=torch.channels_last)
    y = labels.to(device)
    x0 = random_start(x, alpha, seed)
    judged = {o: min(len(x), (judged_images or {}).get(o, len(x))) for o in probes}
    max_maps = max_maps if max_maps is not None else max(num_maps(m) for m in all_layers.values())
    tick = progress if callable(progress) else (lambda k: None)
    bar = None
    per_probe = 1 if implementation == "fast" else len(probes)
    if progress is True:
        bar = tqdm(total=per_probe * sum(min(num_maps(m), max_maps) for m in all_layers.values()),
                   desc="testing feature maps", unit="map", leave=False, dynamic_ncols=True)
        tick = bar.update
    was_training = model.training
    model.eval()
    requires = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)  # gradients are needed w.r.t. the input only
    try:
        signs = consumer_signs(model, x[:1], all_layers) if "mse" not in probes else None
        if implementation == "reference":
            found = {}
            for objective, eps in probes.items():
                probs, candidates = {}, {}
                acc = score_reference(model, all_layers, x, y, x0, eps, tick, max_maps, objective, signs, probs,
                                      candidates, judged[objective])
                found[objective] = (acc, probs, candidates)
        else:
            found = score_batched(model, all_layers, x, y, x0, probes, tick, max_maps, batch_images, signs,
                                  keep_probs, judged)
        tests = {}
        for objective, eps in probes.items():
            acc, probs, candidates = found[objective]
            m = judged[objective]
            null = None
            if keep_probs:
                x_null = null_images(objective, x0, eps, seed + 1, field_null)[:m]
                with torch.inference_mode():
                    null = model(x_null).float().softmax(1).cpu()
            tests[objective] = MapTest(acc, y[:m].cpu(), probs if keep_probs else {}, null, candidates)
        return tests
    finally:
        for p, r in zip(model.parameters(), requires):
            p.requires_grad_(r)
        model.train(was_training)
        if bar is not None:
            bar.close()
