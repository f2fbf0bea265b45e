"""IBD-PSC (Hou, Feng, Hua, Luo, Zhang, Li, "IBD-PSC: Input-level Backdoor Detection via Parameter-oriented Scaling
Consistency", ICML 2024).

Amplifying the BatchNorm parameters of a model's last layers wrecks its predictions on clean images but leaves a
triggered image's prediction confident: the backdoor's path survives the amplification. The model's BatchNorm2d
layers are listed in forward order, last first; the amplified model A_k multiplies the weight and bias of the last
k of them by ``omega`` (1.5; running statistics untouched). :meth:`fit` picks k̂, the smallest k whose error on the
clean fit images (true labels) exceeds ``xi`` (0.6). Detection uses A_{k̂+1}, ..., A_{k̂+n} with n = ``models`` (5):
PSC(x) = the mean over them of softmax(A_i(x))[ŷ], ŷ the bare model's prediction. High PSC means triggered. The
score is -ln(1 - PSC), in the same order as PSC, and the paper's fixed rule PSC >= 0.9 is score >= ln 10
(``published_threshold``).

Cost: 1 + the distinct amplified models' passes per input (at most 1 + ``models`` = 6), and at fit time at most one
pass over the fit images per BatchNorm layer.

Where ours differs, and why:
- A_k scales the layer's output (``omega (gamma x̂ + beta)`` is exactly the layer with gamma and beta scaled) with
  forward hooks on the model itself: no copies of the model, and BatchNorm layers without affine parameters are
  handled the same way.
- When k̂ + n exceeds the number L of BatchNorm layers, the reference code's slices stop at L, so A_L is counted
  several times; ours gives PSC the same weights but runs each distinct model once.
- When no k reaches ``xi``, the reference returns nothing and fails later; ours takes k̂ = L and records it
  (``state()["reached_xi"]`` false).
- The score is -ln(1 - PSC) computed from log-probabilities, not PSC itself: the order is the same, but confident
  predictions whose probability rounds to 1 in float32 (a triggered input and a confident clean one) stay apart
  instead of tying at PSC = 1, where no threshold can separate them.
- Layer selection uses the fit split and the threshold the calibration split: disjoint (the BackdoorBox test draws
  its validation images from the test set it then evaluates on).
"""

import contextlib
import math
from collections import Counter

import torch
from torch import nn

from ..errors import MapPruneError
from ..probes import forward_hooks
from .base import InputDetector, forward_in_chunks, model_device


def batchnorm_layers(model: nn.Module) -> list[str]:
    """The names of the model's BatchNorm2d layers, last registered first (registration order is forward order
    in mapprune's models)."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)][::-1]


@contextlib.contextmanager
def amplified(model: nn.Module, names: list[str], omega: float):
    """``model`` with the outputs of the BatchNorm layers ``names`` multiplied by ``omega`` inside the block."""
    modules = dict(model.named_modules())
    with forward_hooks({n: modules[n] for n in names}, lambda name, mod, inputs, out: out * omega):
        yield model


class IBDPSC(InputDetector):
    """IBD-PSC's confidence under amplified BatchNorm parameters (see the module's docstring)."""

    name = "ibd-psc"
    paper = "Hou et al., ICML 2024"
    published_threshold = math.log(10)  # PSC >= 0.9

    def __init__(self, *, models: int = 5, omega: float = 1.5, xi: float = 0.6, batch_size: int = 512,
                 seed: int = 0):
        super().__init__(batch_size=batch_size, seed=seed)
        if models < 1 or not omega > 1 or not 0 < xi < 1:
            raise MapPruneError(f"IBD-PSC takes models >= 1, omega > 1 and xi in (0, 1); got {models}, {omega} and "
                                f"{xi}")
        self.models, self.omega, self.xi = models, omega, xi
        self.layers: list[str] = []
        self.k_hat: int | None = None
        self.reached_xi = True
        self.errors: list[float] = []
        self.weights: dict[int, int] = {}  # k -> how many of the n amplified models are A_k

    def forward_passes(self) -> int:
        return 1 + (len(self.weights) if self.weights else self.models)

    def state(self) -> dict:
        return {"batchnorm_layers": len(self.layers), "k_hat": self.k_hat, "reached_xi": self.reached_xi,
                "fit_errors": [round(e, 4) for e in self.errors],
                "amplified": {str(k): w for k, w in sorted(self.weights.items())}}

    @torch.no_grad()
    def _fit(self, model, x, y):
        self.layers = batchnorm_layers(model)
        if not self.layers:
            raise MapPruneError("IBD-PSC amplifies BatchNorm2d layers, and the model has none")
        device = model_device(model)
        xd, yd = x.to(device), y.to(device)
        self.errors, self.k_hat = [], None
        for k in range(1, len(self.layers) + 1):
            with amplified(model, self.layers[:k], self.omega):
                pred = forward_in_chunks(model, xd, self.batch_size).argmax(1)
            self.errors.append(float((pred != yd).float().mean()))
            if self.errors[-1] > self.xi:
                self.k_hat = k
                break
        self.reached_xi = self.k_hat is not None
        if self.k_hat is None:
            self.k_hat = len(self.layers)
        top = len(self.layers)
        self.weights = dict(Counter(min(k, top) for k in range(self.k_hat + 1, self.k_hat + self.models + 1)))

    def _score(self, model, x, logits, g):
        predicted = logits.argmax(1)
        # log(1 - p_i[ŷ]) from the logits: the other classes' log-sum-exp minus all classes', exact where p rounds
        # to 1 in floating point
        miss = []
        for k, weight in self.weights.items():
            with amplified(model, self.layers[:k], self.omega):
                z = model(x).double()
            others = z.scatter(1, predicted[:, None], -math.inf).logsumexp(1)
            miss.append(others - z.logsumexp(1) + math.log(weight))
        return -(torch.stack(miss).logsumexp(0) - math.log(self.models)).float()
