"""The diagnosis's ground truth per feature map (every Conv2d channel): the trigger response (shift of the map's
spatial mean and max between triggered and clean test images, in units of the clean spread) and the causal effect
(ASR and ACC change when that one map is pruned the way FMT prunes), with the test images both are measured on."""

from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ...checkpoint import atomic_save, load_tensors
from ...defenses.pruning import PruneMask
from ...metrics import predict
from ...probes import conv_layers, following_batchnorms, forward_hooks


def flat_index(layers: dict[str, int]) -> list[tuple[str, int]]:
    """Every (conv name, channel) in a fixed order: layers in registration order, channels ascending."""
    return [(name, c) for name, width in layers.items() for c in range(width)]


def flatten(d: dict[str, torch.Tensor]) -> torch.Tensor:
    """Every layer's values in one float64 vector, in :func:`flat_index`'s order."""
    return torch.cat([v.double().flatten() for v in d.values()])


@torch.inference_mode()
def map_statistics(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> dict[str, torch.Tensor]:
    """{conv name: (N, C, 2)}: each map's spatial mean and spatial max per uint8 image."""
    device = next(model.parameters()).device
    layers = conv_layers(model)
    stats = {name: [] for name in layers}
    def record(name, mod, inputs, o):
        stats[name].append(torch.stack([o.float().mean((2, 3)), o.float().amax((2, 3))], -1).cpu())

    with forward_hooks(layers, record):
        for i in range(0, len(x), batch_size):
            model(x[i:i + batch_size].to(device).float().div_(255))
    return {name: torch.cat(v) for name, v in stats.items()}


def trigger_response(model: nn.Module, clean: torch.Tensor, triggered: torch.Tensor) -> dict[str, torch.Tensor]:
    """{conv name: (C,)} the largest of |shift of the spatial mean| and |shift of the spatial max| between the
    triggered and clean images, each divided by its spread over the clean images (a z-score)."""
    was = model.training
    model.eval()
    a, b = map_statistics(model, clean), map_statistics(model, triggered)
    model.train(was)
    out = {}
    for name in a:
        sd = a[name].std(0).clamp_min(1e-6)
        z = (b[name].mean(0) - a[name].mean(0)) / sd  # (C, 2)
        out[name] = z.abs().amax(-1)
    return out


class SingleMapPruner:
    """Prunes one map at a time in place, exactly as FMT prunes (the same :class:`PruneMask` targets: filter, bias
    and consumer-BN gamma to zero), and puts it back."""

    def __init__(self, model: nn.Module, example: torch.Tensor):
        self.model = model
        self.bns = following_batchnorms(model, example)

    @torch.no_grad()
    def ablate(self, name: str, channel: int) -> list:
        mask = PruneMask(self.model, {name: [channel]}, self.bns)
        saved = [(t, channel, t[channel].clone()) for t, _ in mask.targets]
        mask()
        return saved

    @torch.no_grad()
    def restore(self, saved: list) -> None:
        for t, channel, v in saved:
            t[channel] = v


def rates(model, xc, yc, xt, yt) -> tuple[float, float]:
    """(ACC on the clean images, ASR on the triggered ones)."""
    acc = (predict(model, xc) == yc).double().mean().item()
    asr = (predict(model, xt) == yt).double().mean().item()
    return acc, asr


def causal_effect(model: nn.Module, xc, yc, xt, yt, progress: bool = False) -> dict[str, torch.Tensor]:
    """{conv name: (C, 2)}: (drop in ASR, drop in ACC) when that one map alone is pruned."""
    model.eval()
    pruner = SingleMapPruner(model, xc[:1].to(next(model.parameters()).device).float() / 255)
    acc0, asr0 = rates(model, xc, yc, xt, yt)
    layers = conv_layers(model)
    bar = None
    if progress:
        bar = tqdm(total=sum(m.out_channels for m in layers.values()), desc="ablating maps", unit="map", leave=False)
    out = {}
    for name, conv in layers.items():
        eff = torch.zeros(conv.out_channels, 2, dtype=torch.float64)
        for c in range(conv.out_channels):
            saved = pruner.ablate(name, c)
            acc, asr = rates(model, xc, yc, xt, yt)
            pruner.restore(saved)
            eff[c] = torch.tensor([asr0 - asr, acc0 - acc])
            if bar is not None:
                bar.update(1)
        out[name] = eff
    if bar is not None:
        bar.close()
    return out


def evaluation_images(r, n: int, seed: int):
    """n clean test images (all classes) for ACC; n triggered non-target test images for ASR (test split only)."""
    d, atk = r.dataset, r.attack
    g = torch.Generator().manual_seed(seed)
    ic = torch.randperm(len(d.y_test), generator=g)[:n]
    keep = torch.arange(len(d.y_test)) if atk.all_to_all else torch.nonzero(d.y_test != atk.target).flatten()
    it = keep[torch.randperm(len(keep), generator=g)[:n]]
    xt = d.x_test[it]
    return d.x_test[ic], d.y_test[ic], xt, atk.apply(xt), atk.target_labels(d.y_test[it])


def ground_truth(model, r, n: int, seed: int, cache: Path | None, progress: bool) -> dict[str, dict[str, torch.Tensor]]:
    """{"response": {conv: (C,)}, "effect": {conv: (C, 2)}}, read from ``cache`` when it matches (n, seed)."""
    if cache is not None and cache.is_file():
        tensors, meta = load_tensors(cache)
        if meta.get("n") == n and meta.get("seed") == seed:
            out = {"response": {}, "effect": {}}
            for k, v in tensors.items():
                kind, name = k.split(":", 1)
                out[kind][name] = v
            return out
    xc, yc, xt_clean, xt, yt = evaluation_images(r, n, seed)
    response = trigger_response(model, xt_clean, xt)
    effect = causal_effect(model, xc, yc, xt, yt, progress=progress)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"response:{k}": v for k, v in response.items()} | {f"effect:{k}": v for k, v in effect.items()}
        atomic_save(tensors, cache, {"n": n, "seed": seed})
    return {"response": response, "effect": effect}
