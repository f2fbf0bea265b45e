"""An input detector guided by Feature Map Testing: an input is flagged when the feature maps FMT found suspicious
fire above their clean range.

FMT's testing (:func:`mapprune.detect.scan.scan`: the patch, warp and smooth probes on the defender's clean fit
images; no trigger, no poisoned image) names the ``maps`` (10) feature maps that pull other classes' images hardest
towards the suspected target t̂. A trigger works through such maps: it drives them beyond anything a clean image
does. For each flagged map m (layer l, channel c), a_m(x) is the spatial maximum of channel c of layer l's output
(``statistic="mean"``: the spatial mean), oriented by the sign with which the next BatchNorm passes the map on (a
map the network reads through a negative gamma "fires" downwards). :meth:`fit` keeps the mean mu_m and standard
deviation sigma_m of a_m over the clean fit images, all classes together; the score is the summed excess

    s(x) = sum over m of max(0, (a_m(x) - mu_m) / sigma_m),

counting only activation above the clean mean, because backdoor maps fire on the trigger (``direction="both"``
sums |z| instead). ``gate=True`` scores only inputs predicted as t̂ (others score 0): a successful trigger sends
its input to t̂, so the gate cannot raise the detection rate, and it lowers the false alarms.

Cost: 1 forward pass per input, the bare prediction's own (hooks read the maps on the way); at fit time FMT's
testing (seconds on the digits) and one pass over the fit images.

Design choices (a mapprune detector; no paper to differ from), each measured on the digits in docs/guard.md:
- the spatial maximum by default: a patch trigger is local, and the mean divides it by the map's area (AUROC on
  the digits BadNets model 0.998 with the maximum, 0.864 with the mean);
- one-sided by default: the maps FMT flags are the ones whose excitation pulls to the target. Under the digits'
  Blended and WaNet triggers they are pushed down instead (AUROC 0.08 and 0.11 one-sided, 0.64 and 0.65 with
  ``direction="both"``, which costs 0.998 -> 0.988 on BadNets);
- sigma_m is floored at ``SIGMA_FLOOR`` (5%) of the median deviation of its layer's maps, so a map nearly constant
  on clean images cannot turn a tiny change into a huge score;
- the statistics are class-agnostic: per-class ones would need many clean images per class, and the gate already
  uses the class.
"""

import torch
from torch import nn

from ..detect.scan import scan
from ..errors import MapPruneError
from ..probes import channel_dim, consumer_signs, forward_hooks, map_layers
from .base import InputDetector, model_device

SIGMA_FLOOR = 0.05
STATISTICS = ("mean", "max")
DIRECTIONS = ("up", "both")


def _reduce(out: torch.Tensor, layer: nn.Module, sign: torch.Tensor, statistic: str) -> torch.Tensor:
    """(N, C): each map of the layer's output ``out``, oriented by ``sign``, reduced over every axis but the batch
    and the map (positions, tokens)."""
    out = out.float().movedim(channel_dim(layer), -1)  # (N, ..., C)
    out = (out * sign.to(out.device)).flatten(1, -2) if out.dim() > 2 else (out * sign.to(out.device))[:, None]
    return out.mean(1) if statistic == "mean" else out.amax(1)


class FMTGuided(InputDetector):
    """FMT's suspicious maps watched at inference (see the module's docstring)."""

    name = "fmt"
    paper = "mapprune's Feature Map Testing (docs/fmt.md)"

    def __init__(self, *, maps: int = 10, statistic: str = "max", direction: str = "up", gate: bool = False,
                 batch_size: int = 512, seed: int = 0):
        super().__init__(batch_size=batch_size, seed=seed)
        if maps < 1 or statistic not in STATISTICS or direction not in DIRECTIONS:
            raise MapPruneError(f"the fmt detector takes maps >= 1, statistic in {', '.join(STATISTICS)} and direction "
                                f"in {', '.join(DIRECTIONS)}; got {maps}, {statistic!r} and {direction!r}")
        self.maps, self.statistic, self.direction, self.gate = maps, statistic, direction, gate
        self.target: int | None = None
        self.flagged: list[dict] = []  # {"layer", "channel", "pull"} as FMT's testing ranked them
        self.signs: dict[str, torch.Tensor] = {}
        self.mu = self.sigma = None  # (M,) per flagged map

    def forward_passes(self) -> int:
        return 1

    def state(self) -> dict:
        if self.mu is None:
            return {}
        return {"suspected_target": self.target,
                "maps": [{**m, "mean": round(float(mu), 5), "std": round(float(sd), 5)}
                         for m, mu, sd in zip(self.flagged, self.mu, self.sigma)]}

    def _activations(self, model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(logits, {layer: (N, C) reduced maps}) from one forward pass of ``x``."""
        modules = dict(model.named_modules())
        seen: dict[str, torch.Tensor] = {}

        def record(name, mod, inputs, out):
            if name not in seen:  # a layer called twice: its first call, as FMT tests it
                seen[name] = _reduce(out, mod, self.signs[name], self.statistic)

        with forward_hooks({n: modules[n] for n in self.signs}, record):
            logits = model(x)
        return logits, seen

    def _fit(self, model, x, y):
        device = model_device(model)
        with torch.enable_grad():  # FMT's probes take input gradients, whatever the caller's grad mode
            found = scan(model, x, y, nc=False, mmbd=False, stimulate=0, n_maps=self.maps, seed=self.seed,
                         device=str(device))
        self.target, self.flagged = found.target, found.suspicious_maps
        layers = map_layers(model)
        chosen = {m["layer"]: layers[m["layer"]] for m in self.flagged}
        self.signs = consumer_signs(model, x[:1].to(device), chosen)
        with torch.no_grad():
            acts = [self._activations(model, x[i:i + self.batch_size].to(device))[1]
                    for i in range(0, len(x), self.batch_size)]
        per_layer = {n: torch.cat([a[n] for a in acts]).double().cpu() for n in chosen}
        mu, sigma = [], []
        for m in self.flagged:
            a = per_layer[m["layer"]]
            typical = float(a.std(0, unbiased=False).median())
            mu.append(float(a[:, m["channel"]].mean()))
            sigma.append(max(float(a[:, m["channel"]].std(unbiased=False)), SIGMA_FLOOR * typical, 1e-12))
        self.mu, self.sigma = torch.tensor(mu), torch.tensor(sigma)

    def _predict_and_score(self, model, x, g):
        logits, seen = self._activations(model, x)
        a = torch.stack([seen[m["layer"]][:, m["channel"]] for m in self.flagged], 1)
        z = (a - self.mu.to(a.device)) / self.sigma.to(a.device)
        excess = (z.clamp_min(0) if self.direction == "up" else z.abs()).sum(1)
        if self.gate:
            excess = torch.where(logits.argmax(1) == self.target, excess, torch.zeros_like(excess))
        return logits, excess
