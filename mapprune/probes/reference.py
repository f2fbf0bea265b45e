"""The readable per-map probe: for each map on its own, the forward to its layer, the clean activation recomputed,
one gradient, one step, and the model's predictions on the stepped images; no batching. Written to be read, not to
be fast: it is the oracle the batched probe (:mod:`.batched`) is tested against.
"""

import torch

from .layers import feature_map, layer_output, num_maps
from .perturbations import FIELDS, cat_candidates, default_patch, field_leaf, patch_step


def adversarial_for_map(model, layer, x, x0, channel: int, eps: float, objective: str = "mse",
                        sign: float = 1.0, found: list | None = None) -> torch.Tensor:
    """x_adv for one feature map: one signed step from x0 away from the map's clean activation (``mse``, the
    paper's) or up the map's activation as its consumer sees it (``excite``: ``sign`` is +1, or -1 where the
    BatchNorm reading the map has a negative gamma; ``patch``: through one small patch; ``warp``: through one
    smooth warp of the image, a signed step on its flow's control points, ``eps`` pixels; ``smooth``: through one
    smooth additive field of L-inf size ``eps``). ``found`` collects the patch or field the step used."""
    if objective in FIELDS:
        cls = FIELDS[objective][0]
        phi = field_leaf(objective, x0)
        loss = sign * feature_map(layer_output(model, layer, cls.apply(x0, phi, eps)), layer, channel).mean()
        (grad,) = torch.autograd.grad(loss, phi)
        if found is not None:
            found.append(cls(grad.sign().cpu(), eps))
        return cls.apply(x0, grad.sign(), eps)
    x_start = x0.clone().requires_grad_(True)
    if objective in ("excite", "patch"):
        loss = sign * feature_map(layer_output(model, layer, x_start), layer, channel).mean()
    else:
        with torch.no_grad():
            clean = feature_map(layer_output(model, layer, x), layer, channel)
        loss = (feature_map(layer_output(model, layer, x_start), layer, channel) - clean).square().mean()
    (grad,) = torch.autograd.grad(loss, x_start)
    if objective == "patch":
        return patch_step(x0, grad.unsqueeze(0), default_patch(x0.shape), found)[0]
    return (x0 + eps * grad.sign()).clamp(0, 1)


def score_reference(model, layers, x, y, x0, eps, progress, max_maps, objective, signs, probs_out,
                    candidates_out, judged: int) -> dict[str, torch.Tensor]:
    """The plain per-map loop of the method's description: for each map, the gradient of the probe's loss on the
    map (``mse``: its squared deviation from the clean activation), one step, and the accuracy on the stepped images
    (the first ``judged``). Fills ``probs_out`` with each layer's (C, judged, K) softmax outputs and
    ``candidates_out`` with the patches or fields found; returns {layer name: (C,) accuracy}."""
    scores = {}
    for name, layer in layers.items():
        acc = torch.full((num_maps(layer),), float("nan"))
        probs, found = [], []
        for c in range(min(num_maps(layer), max_maps)):
            sign = float(signs[name][c]) if signs is not None else 1.0
            x_adv = adversarial_for_map(model, layer, x, x0, c, eps, objective, sign, found)[:judged]
            with torch.no_grad():
                logits = model(x_adv)
                acc[c] = (logits.argmax(1) == y[:judged]).float().mean().cpu()
                probs.append(logits.float().softmax(1).cpu())
            progress(1)
        scores[name] = acc
        if probs_out is not None:
            probs_out[name] = torch.stack(probs)
        if found:
            candidates_out[name] = cat_candidates(found)
    return scores

