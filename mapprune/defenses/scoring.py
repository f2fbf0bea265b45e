"""FMT's testing phase: feature reverse generation per feature map, scored by accuracy on the adversarial images.

For every tested layer l (every Conv2d, and every nn.Linear but the classifier head: ``pruning.map_layers``)
and output channel c: starting from x0 = clip(x + alpha * s, 0, 1) (one random sign draw shared by all maps),
take one signed step of size eps that pushes channel c of layer l away from its clean value, and record the
fraction of the n images the model still classifies correctly. A map is the channel over everything else in
the layer's output: a conv's ``out[:, c]`` (all positions), a Linear's ``out[..., c]`` (all tokens); "the mean
of a map" is its mean over the images and those positions or tokens.

Two implementations, which give the same scores (on a transformer, up to rounding: its batched backward does not
round exactly as the per-map one, so an input gradient within rounding of zero can take the other sign):
- ``reference``: the plain per-map loop, written to be read (whole-model forwards with a hook, the clean
  activation recomputed per map, no batching);
- ``fast``: per layer, the clean activations and the forward of x0 to layer l once; the backward passes of
  a chunk of k maps batched into one (vmap over cotangents, ``is_grads_batched``), the accuracy pass of the
  k x n adversarial images as one inference-mode batch; memory bounded by ``batch_images``.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import MapPruneError
from ..images import as_unit
from .pruning import MapLayer, channel_dim, following_batchnorms, map_layers, num_maps

OBJECTIVES = ("mse", "excite", "patch", "warp", "smooth")
WARP_GRID = 4  # control points per side of a ``warp`` probe's flow field (WaNet's k)
SMOOTH_GRID = 8  # control points per side of a ``smooth`` probe's additive field (periods of >= 8 px on 32x32)


@dataclass
class MapTest:
    """What testing every feature map measured.

    ``acc``: {conv name: (C,) accuracy of the n stepped images} (the paper's score; low = suspicious).
    ``probs``: {conv name: (C, n, K) softmax of the model on each map's n stepped images}, kept only when asked
    for (``keep_probs``): where the perturbed predictions go is what the target-concentration scorer reads.
    ``null_probs``: (n, K) softmax on the same images stepped in a random sign direction of the same size, the
    null against which a map's pull towards a class is measured. ``labels``: the n true labels.
    ``patches``: with the ``patch`` and ``warp`` objectives, each map's universal patch or warp (FMT's candidate
    triggers: they can be stamped on any image).
    """

    acc: dict[str, torch.Tensor]
    labels: torch.Tensor
    probs: dict[str, torch.Tensor] = field(default_factory=dict)
    null_probs: torch.Tensor | None = None
    patches: dict[str, "Patches | Warps"] = field(default_factory=dict)  # patch / warp objectives', per map


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the layer of interest has run."""


def forward_to(model: nn.Module, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Runs ``model`` on ``x`` only as far as ``layer`` and returns that layer's output."""
    box = {}

    def hook(mod, inputs, output):
        box["out"] = output
        raise _Stop

    handle = layer.register_forward_hook(hook)
    try:
        model(x)
    except _Stop:
        pass
    finally:
        handle.remove()
    if "out" not in box:
        raise MapPruneError("a tested layer never ran in the forward pass; FMT can only test layers the model uses")
    return box["out"]


def feature_map(out: torch.Tensor, layer: MapLayer, channel: int) -> torch.Tensor:
    """Map ``channel`` of ``layer``'s output ``out``: a conv's out[:, c], a Linear's out[..., c]."""
    return out.select(channel_dim(layer), channel)


def _random_sign(x: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, x.shape, generator=g).mul_(2).sub_(1).to(x.device, x.dtype)


FIELD_NULLS = ("sign", "field")


def null_images(objective: str, x0: torch.Tensor, eps: float, seed: int, field_null: str = "sign") -> torch.Tensor:
    """The images a probe's pull is measured against: ``x0`` changed at random by as much as the probe may change
    it. A +-eps step of every pixel, or, for a field probe with ``field_null="field"``, a random field of the
    probe's kind (random +-1 control points, as the probe's own signed step has) and size on each image."""
    if field_null == "field" and objective in FIELDS:
        cls, grid, channels = FIELDS[objective]
        side = grid(min(x0.shape[-2:]))
        g = torch.Generator().manual_seed(seed)
        phi = torch.randint(0, 2, (len(x0), channels(x0.shape[1]), side, side), generator=g).mul_(2).sub_(1)
        return cls.apply(x0, phi.to(x0.device, x0.dtype), eps)
    return (x0 + eps * _random_sign(x0, seed)).clamp(0, 1)


def random_start(x: torch.Tensor, alpha: float, seed: int) -> torch.Tensor:
    return (x + alpha * _random_sign(x, seed)).clamp_(0, 1)


def layer_output(model: nn.Module, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Runs the whole model on ``x`` and returns ``layer``'s output (the plain way, with a forward hook)."""
    box = {}
    # setdefault: a layer called twice reports its first call, as forward_to does.
    handle = layer.register_forward_hook(lambda mod, inputs, output: box.setdefault("out", output))
    try:
        model(x)
    finally:
        handle.remove()
    if "out" not in box:
        raise MapPruneError("a tested layer never ran in the forward pass; FMT can only test layers the model uses")
    return box["out"]


@dataclass
class Patches:
    """k universal patches: ``pos`` (k, 2) top-left corners, ``window`` (k, C, s, s) pixel values in [0, 1]."""

    pos: torch.Tensor
    window: torch.Tensor

    def __len__(self) -> int:
        return len(self.pos)

    def select(self, idx) -> "Patches":
        return Patches(self.pos[idx], self.window[idx])

    @staticmethod
    def cat(parts: list["Patches"]) -> "Patches":
        return Patches(torch.cat([p.pos for p in parts]), torch.cat([p.window for p in parts]))

    def stamp(self, x: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
        """x (n, C, H, W) with patch ``which[i]`` pasted onto image i (a copy; x is not changed)."""
        s = self.window.shape[-1]
        h, w = x.shape[-2:]
        pos = self.pos.to(x.device)[which]
        win = self.window.to(x.device, x.dtype)[which]
        rows = torch.arange(h, device=x.device)
        cols = torch.arange(w, device=x.device)
        top, left = pos[:, 0], pos[:, 1]
        in_rows = (rows[None] >= top[:, None]) & (rows[None] < top[:, None] + s)  # (n, H)
        in_cols = (cols[None] >= left[:, None]) & (cols[None] < left[:, None] + s)  # (n, W)
        mask = (in_rows[:, :, None] & in_cols[:, None, :])[:, None]  # (n, 1, H, W)
        # Scatter the window into a full-size canvas at each image's position.
        canvas = torch.zeros_like(x)
        r = (top[:, None] + torch.arange(s, device=x.device)[None]).clamp_(max=h - 1)  # (n, s)
        c = (left[:, None] + torch.arange(s, device=x.device)[None]).clamp_(max=w - 1)
        n_idx = torch.arange(len(x), device=x.device)[:, None, None, None]
        ch_idx = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
        canvas[n_idx, ch_idx, r[:, None, :, None], c[:, None, None, :]] = win
        return torch.where(mask, canvas, x)


def _identity_grid(h: int, w: int, device) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, h, device=device), torch.linspace(-1, 1, w, device=device),
                            indexing="ij")
    return torch.stack([xs, ys], -1)  # (H, W, 2), x first as grid_sample wants


def warp(x: torch.Tensor, phi: torch.Tensor, pixels: float) -> torch.Tensor:
    """x (n, C, H, W) resampled along a smooth flow: ``phi`` (n or 1, 2, k, k) control points, bicubically
    upsampled, times ``pixels`` (the displacement, in pixels, where a control point is 1); bilinear sampling at
    pixel centres, border padding. With phi = 0 it returns x exactly."""
    h, w = x.shape[-2:]
    flow = torch.nn.functional.interpolate(phi, size=(h, w), mode="bicubic", align_corners=True)
    scale = torch.tensor([2 / max(1, w - 1), 2 / max(1, h - 1)], device=x.device, dtype=x.dtype)
    grid = (_identity_grid(h, w, x.device).to(x.dtype) + pixels * flow.permute(0, 2, 3, 1) * scale).clamp(-1, 1)
    grid = grid.expand(len(x), h, w, 2)
    return torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)


def smooth_shift(x: torch.Tensor, phi: torch.Tensor, eps: float) -> torch.Tensor:
    """x (n, C, H, W) plus a smooth additive field: ``phi`` (n or 1, C, k, k) control points, bicubically
    upsampled and clipped to [-1, 1], times ``eps`` (its L-inf size); the result clamped to [0, 1]. A low-pass
    change of every pixel at once, the kind of trigger (Low Frequency, SIG, a faint blend) that neither a small
    patch nor a warp can express."""
    field = torch.nn.functional.interpolate(phi, size=x.shape[-2:], mode="bicubic", align_corners=True)
    return (x + eps * field.clamp(-1, 1)).clamp(0, 1)


@dataclass
class Field:
    """k universal smooth fields: ``phi`` (k, P, g, g) control points, ``pixels`` their size (a warp's
    displacement in pixels, a shift's L-inf amplitude). Subclasses say how a field changes an image."""

    phi: torch.Tensor
    pixels: float

    def __len__(self) -> int:
        return len(self.phi)

    def select(self, idx) -> "Field":
        return type(self)(self.phi[idx], self.pixels)

    @classmethod
    def cat(cls, parts: list["Field"]) -> "Field":
        return cls(torch.cat([p.phi for p in parts]), parts[0].pixels)

    @staticmethod
    def apply(x: torch.Tensor, phi: torch.Tensor, size: float) -> torch.Tensor:
        raise NotImplementedError

    def stamp(self, x: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
        """x (n, C, H, W) with field ``which[i]`` applied to image i."""
        return self.apply(x, self.phi.to(x.device, x.dtype)[which], self.pixels)


class Warps(Field):
    """k universal warps (:func:`warp`): ``phi`` (k, 2, g, g) flow control points, ``pixels`` the displacement."""

    apply = staticmethod(warp)


class Shifts(Field):
    """k universal smooth additive changes (:func:`smooth_shift`): ``phi`` (k, C, g, g), ``pixels`` the L-inf
    amplitude."""

    apply = staticmethod(smooth_shift)


# The objectives whose leaf is a field's control points: (field class, control points per side for an image side,
# channels). A smooth field keeps SMOOTH_GRID points per 32 pixels (at least 2), so it stays low-pass on small images.
FIELDS = {"warp": (Warps, lambda side: WARP_GRID, lambda c: 2),
          "smooth": (Shifts, lambda side: max(2, round(SMOOTH_GRID * side / 32)), lambda c: c)}


def field_leaf(objective: str, x: torch.Tensor) -> torch.Tensor:
    """The zero control points (1, P, g, g) of a field objective's universal change, requiring grad."""
    _, grid, channels = FIELDS[objective]
    g = grid(min(x.shape[-2:]))
    return torch.zeros(1, channels(x.shape[1]), g, g, device=x.device, dtype=x.dtype, requires_grad=True)


def find_patches(grad: torch.Tensor, size: int) -> Patches:
    """One universal patch per map from (k, n, C, H, W) gradients: the gradient summed over the n images (one
    pattern for all, as a trigger is); the size x size window where it is largest, with pixels at 1 where the
    summed gradient is positive and 0 where it is not (an unbounded change on a small support, which a dense
    L-inf step cannot make)."""
    g = grad.sum(1)
    heat = torch.nn.functional.avg_pool2d(g.abs().sum(1, keepdim=True), size, stride=1)
    ww = heat.shape[-1]
    flat = heat.flatten(1).argmax(1)
    pos = torch.stack([flat // ww, flat % ww], 1)
    r = pos[:, 0, None] + torch.arange(size, device=grad.device)[None]  # (k, s)
    c = pos[:, 1, None] + torch.arange(size, device=grad.device)[None]
    k_idx = torch.arange(len(g), device=grad.device)[:, None, None, None]
    ch_idx = torch.arange(g.shape[1], device=grad.device)[None, :, None, None]
    window = (g[k_idx, ch_idx, r[:, None, :, None], c[:, None, None, :]] > 0).to(grad.dtype)
    return Patches(pos, window)


def patch_step(x0: torch.Tensor, grad: torch.Tensor, size: int, patches_out: list | None = None) -> torch.Tensor:
    """One universal patch per map (:func:`find_patches`): (k, n, C, H, W) gradients of k maps -> (k, n, C, H, W)
    images, x0 with map j's patch pasted on. ``patches_out`` collects the patches found."""
    k, n = grad.shape[:2]
    patches = find_patches(grad, size)
    if patches_out is not None:
        patches_out.append(Patches(patches.pos.cpu(), patches.window.cpu()))
    which = torch.arange(k, device=x0.device).repeat_interleave(n)
    return patches.stamp(x0.repeat(k, 1, 1, 1), which).view(k, n, *x0.shape[1:])


def default_patch(image_shape) -> int:
    """The patch side of the ``patch`` objective: 5 pixels on 32x32 images, scaled with the image."""
    return max(1, round(5 * min(image_shape[-2:]) / 32))


def adversarial_for_map(model, layer, x, x0, channel: int, eps: float, objective: str = "mse",
                        sign: float = 1.0, patches_out: list | None = None) -> torch.Tensor:
    """x_adv for one feature map: one signed step from x0 away from the map's clean activation (``mse``, the
    paper's) or up the map's activation as its consumer sees it (``excite``: ``sign`` is +1, or -1 where the
    BatchNorm reading the map has a negative gamma; ``patch``: through one small patch; ``warp``: through one
    smooth warp of the image, a signed step on its flow's control points, ``eps`` pixels)."""
    if objective in FIELDS:
        cls = FIELDS[objective][0]
        phi = field_leaf(objective, x0)
        loss = sign * feature_map(layer_output(model, layer, cls.apply(x0, phi, eps)), layer, channel).mean()
        (grad,) = torch.autograd.grad(loss, phi)
        if patches_out is not None:
            patches_out.append(cls(grad.sign().cpu(), eps))
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
        return patch_step(x0, grad.unsqueeze(0), default_patch(x0.shape), patches_out)[0]
    return (x0 + eps * grad.sign()).clamp(0, 1)


def _score_reference(model, layers, x, y, x0, eps, progress, max_maps, objective, signs, probs_out,
                     patches_out, judged: int) -> dict[str, torch.Tensor]:
    """The plain per-map loop of the method's description: for each map, the clean activation, the gradient of
    the map's squared deviation, one signed step, and the accuracy on the stepped images (the first ``judged``)."""
    scores = {}
    for name, layer in layers.items():
        acc = torch.full((num_maps(layer),), float("nan"))
        probs, patches = [], []
        for c in range(min(num_maps(layer), max_maps)):
            sign = float(signs[name][c]) if signs is not None else 1.0
            x_adv = adversarial_for_map(model, layer, x, x0, c, eps, objective, sign, patches)[:judged]
            with torch.no_grad():
                logits = model(x_adv)
                acc[c] = (logits.argmax(1) == y[:judged]).float().mean().cpu()
                probs.append(logits.float().softmax(1).cpu())
            progress(1)
        scores[name] = acc
        if probs_out is not None:
            probs_out[name] = torch.stack(probs)
        if patches:
            patches_out[name] = _cat_patches(patches)
    return scores


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


def _score_fast(model, layers, x, y, x0, probes: dict[str, float], progress, max_maps, batch_images, signs,
                keep_probs, judged: dict[str, int]) -> dict[str, tuple[dict, dict, dict]]:
    """{objective: (scores, probs, patches)} for every probe, sharing each layer's forward and batched backward.
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
        out = forward_to(model, layer, x_in)
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
                clean = forward_to(model, layer, x).movedim(cdim, 1)  # (n, C, ...), once per layer
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
            scores, probs_out, patches_out = out_of[objective]
            scores[name] = acc[objective]
            if keep_probs:
                probs_out[name] = torch.cat(probs[objective])
            if found[objective]:
                patches_out[name] = _cat_patches(found[objective])
    return out_of


def _cat_patches(parts: list) -> "Patches | Warps":
    return type(parts[0]).cat(parts)


IMPLEMENTATIONS = ("fast", "reference")


def score_feature_maps(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, **kw) -> dict[str, torch.Tensor]:
    """Per-map accuracy under per-map attack, ``{layer module name: tensor of per-channel accuracies}``: the
    paper's score. Takes :func:`probe_feature_maps`'s arguments."""
    return probe_feature_maps(model, images, labels, **kw).acc


def consumer_signs(model: nn.Module, example: torch.Tensor, layers: dict[str, MapLayer]) -> dict[str, torch.Tensor]:
    """Per layer and channel, the sign with which the next BatchNorm passes the map on (the sign of its gamma);
    +1 where no BatchNorm reads the conv's output directly (residual convs, VGG's last layers without one) and
    for every Linear (a LayerNorm, or nothing, reads it: no per-channel sign to follow)."""
    bns = following_batchnorms(model, example)
    modules = dict(model.named_modules())
    signs = {}
    for name, layer in layers.items():
        s = torch.ones(num_maps(layer))
        bn = modules[bns[name]] if name in bns else None
        if bn is not None and bn.weight is not None:
            s = torch.where(bn.weight.detach().cpu() < 0, -1.0, 1.0)
        signs[name] = s
    return signs


def probe_feature_maps(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, eps: float = 0.06,
                       objective: str = "mse", **kw) -> MapTest:
    """Tests every feature map: one signed input step per map, then the model's predictions on the stepped images.

    ``images``: (n, C, H, W) uint8 or float in [0, 1], on the model's device or CPU; ``labels``: true labels.
    ``objective``: ``mse`` (the paper's: push the map away from its clean value), ``excite`` (push the map up
    as its consumer sees it), ``patch`` (excite it through one small universal patch; see :func:`patch_step`;
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
    left as it was found. ``layers`` restricts testing to those layer names (default: :func:`~.pruning.map_layers`,
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
        from tqdm.auto import tqdm

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
                probs, patches = {}, {}
                acc = _score_reference(model, all_layers, x, y, x0, eps, tick, max_maps, objective, signs, probs,
                                       patches, judged[objective])
                found[objective] = (acc, probs, patches)
        else:
            found = _score_fast(model, all_layers, x, y, x0, probes, tick, max_maps, batch_images, signs,
                                keep_probs, judged)
        tests = {}
        for objective, eps in probes.items():
            acc, probs, patches = found[objective]
            m = judged[objective]
            null = None
            if keep_probs:
                x_null = null_images(objective, x0, eps, seed + 1, field_null)[:m]
                with torch.inference_mode():
                    null = model(x_null).float().softmax(1).cpu()
            tests[objective] = MapTest(acc, y[:m].cpu(), probs if keep_probs else {}, null, patches)
        return tests
    finally:
        for p, r in zip(model.parameters(), requires):
            p.requires_grad_(r)
        model.train(was_training)
        if bar is not None:
            bar.close()
