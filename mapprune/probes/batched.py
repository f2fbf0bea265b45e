"""The batched probe: every map of a layer tested with one forward and batched backwards.

Per layer, the clean activations and the forward of x0 to layer l once; the backward passes of a chunk of k maps
batched into one (vmap over cotangents, ``is_grads_batched``), the accuracy pass of the k x n stepped images as one
inference-mode batch; memory bounded by ``batch_images``. Several probes other than ``mse`` share the forward and
the backward (:func:`_probe_input`). It gives the scores of the per-map loop (:mod:`.reference`); on a transformer
up to rounding (its batched backward does not round exactly as the per-map one, so an input gradient within
rounding of zero can take the other sign).
"""

import torch

from .layers import channel_dim, layer_output, num_maps
from .perturbations import FIELDS, cat_candidates, default_patch, field_leaf, patch_step


def _probe_input(probes: dict[str, float], x0: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The input whose forward to a layer serves every probe, and each probe's gradient leaf.

    One probe: its own input (x0 as the leaf, or the field applied to x0). Several (all but ``mse``, which has
    its own cotangent, may share): x0 (the leaf of patch/excite) plus each field's change ``apply(x0, phi) -
    apply(x0, 0)``, exactly zero at phi = 0, so the value is x0 and one batched backward gives every leaf's
    gradient, each as its own probe's backward would."""
    if len(probes) == 1:
        (objective, eps), = probes.items()
        if objective in FIELDS:
            leaf = field_leaf(objective, x0)
            return FIELDS[objective][0].apply(x0, leaf, eps), {objective: leaf}
        leaf = x0.detach().requires_grad_(True)
        return leaf, {objective: leaf}
    pixel = [o for o in probes if o not in FIELDS]
    x_leaf = x0.detach().requires_grad_(True) if pixel else x0
    leaves, x_in = {o: x_leaf for o in pixel}, x_leaf
    for objective, eps in probes.items():
        if objective in FIELDS:
            cls = FIELDS[objective][0]
            leaf = field_leaf(objective, x0)
            with torch.no_grad():
                still = cls.apply(x0, torch.zeros_like(leaf), eps)
            x_in = x_in + (cls.apply(x0, leaf, eps) - still)
            leaves[objective] = leaf
    return x_in, leaves


def _stepped(objective: str, eps: float, x0: torch.Tensor, grad: torch.Tensor, found: list) -> torch.Tensor:
    """(k * n) images: x0 stepped for each of k maps along its (k, ...) gradient; ``found`` collects patches or
    fields."""
    k, n = len(grad), len(x0)
    if objective == "patch":
        return patch_step(x0, grad, default_patch(x0.shape), found).flatten(0, 1)
    if objective in FIELDS:
        cls = FIELDS[objective][0]
        phi = grad.sign().flatten(0, 1)  # (k, P, g, g)
        found.append(cls(phi.cpu(), eps))
        return cls.apply(x0.repeat(k, 1, 1, 1), phi.repeat_interleave(n, 0), eps)
    return (x0.unsqueeze(0) + eps * grad.sign()).clamp_(0, 1).flatten(0, 1)


def score_batched(model, layers, x, y, x0, probes: dict[str, float], progress, max_maps, batch_images, signs,
                  keep_probs, judged: dict[str, int]) -> dict[str, tuple[dict, dict, dict]]:
    """{objective: (scores, probs, candidates)} for every probe, sharing each layer's forward and batched backward.
    ``judged[objective]``: how many of the images (the first ones) the probe's stepped images are judged on."""
    n = len(x)
    chunk = max(1, batch_images // n)
    out_of = {o: ({}, {}, {}) for o in probes}
    for name, layer in layers.items():
        channels = min(num_maps(layer), max_maps)
        cdim = channel_dim(layer)
        # One forward of x0 to layer l serves every map of the layer: each map's gradient is a backward pass
        # of the same graph with another cotangent, so the backwards are batched (vmap) over maps.
        x_in, leaves = _probe_input(probes, x0)
        out = layer_output(model, layer, x_in)
        unique = list(dict.fromkeys(leaves.values()))
        # The cotangents are built channel-first, (n, C, ...rest), and moved back to the output's layout: a no-op
        # for a conv, channel last for a Linear.
        out_cf = out.detach().movedim(cdim, 1)
        scale = torch.full((), 1.0 / (out_cf[:, 0].numel()), device=x.device, dtype=out.dtype)
        if "mse" not in probes:
            # d/d(out) of sign * mean(out[:, c]): a constant sign / numel in channel c.
            sign = signs[name][:channels].to(x.device, out.dtype).view(1, channels, *[1] * (out.dim() - 2))
            cot_all = (scale * sign).expand(out.shape[0], channels, *out_cf.shape[2:])
        else:
            with torch.inference_mode():
                clean = layer_output(model, layer, x).movedim(cdim, 1)  # (n, C, ...), once per layer
            # d/d(out) of mean((out[:, c] - clean[:, c])^2): 2 (out - clean) / numel in channel c, zero
            # elsewhere, formed with the same operations autograd uses for the reference loop's loss.
            per_map = out_cf[:, :channels] - clean[:, :channels]
            cot_all = scale * (2 * per_map)
        acc = {o: torch.full((num_maps(layer),), float("nan")) for o in probes}
        probs, found = {o: [] for o in probes}, {o: [] for o in probes}
        for c0 in range(0, channels, chunk):
            k = min(chunk, channels - c0)
            ks = torch.arange(k, device=x.device)
            cot = torch.zeros((k, *out_cf.shape), device=x.device, dtype=out.dtype)
            cot[ks, :, c0 + ks] = cot_all[:, c0:c0 + k].transpose(0, 1)
            cot = cot.movedim(2, cdim + 1 if cdim >= 0 else cdim)  # dim 0 is the batch of maps
            grads = dict(zip(unique, torch.autograd.grad(out, unique, cot, retain_graph=True, is_grads_batched=True)))
            with torch.inference_mode():
                for objective, eps in probes.items():
                    m = judged[objective]
                    x_adv = _stepped(objective, eps, x0, grads[leaves[objective]], found[objective])
                    if m < n:  # the step used every image's gradient; only the first m are judged
                        x_adv = x_adv.view(k, n, *x_adv.shape[1:])[:, :m].flatten(0, 1)
                    logits = model(x_adv.contiguous(memory_format=torch.channels_last))
                    correct = (logits.argmax(1) == y[:m].repeat(k)).view(k, m)
                    acc[objective][c0:c0 + k] = correct.float().mean(1).cpu()
                    if keep_probs:
                        probs[objective].append(logits.float().softmax(1).view(k, m, -1).cpu())
            del cot, grads
            progress(k)
        del out, out_cf, x_in, leaves, unique
        for objective in probes:
            scores, probs_out, candidates_out = out_of[objective]
            scores[name] = acc[objective]
            if keep_probs:
                probs_out[name] = torch.cat(probs[objective])
            if found[objective]:
                candidates_out[name] = cat_candidates(found[objective])
    return out_of
