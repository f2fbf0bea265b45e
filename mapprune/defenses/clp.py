"""CLP, Channel Lipschitzness-based Pruning (Zheng et al., ECCV 2022): data-free.

For each conv whose output a BatchNorm normalises directly, channel k's upper bound on its Lipschitz constant
(UCLC) is the largest singular value of its filter, reshaped to (C_in, kh * kw), times |gamma_k / sigma_k| of that
BatchNorm. Within a layer, channels with UCLC > mean + u * std are pruned: the BatchNorm's gamma and beta are
zeroed, as the paper does. No data, no fine-tune. (On PreAct networks the stem conv's output also runs along
the identity path, which zeroing the BatchNorm does not touch; zeroing the filter as well, so the channel went
silent there too, collapsed the CIFAR-10 WaNet model to 10% accuracy: measured, docs/results.md.)

Each BatchNorm is paired with the conv that *produces* its input (traced by tensor identity,
``pruning.following_batchnorms``), not with the last conv registered before it: the public code's registration
order pairs PreAct networks' ``bn1`` with the previous block's shortcut conv. Convs whose output is summed
before any BatchNorm (PreAct's residual and shortcut convs) have no BatchNorm of their own and are skipped
(listed in the result).
"""

import time

import torch

from ..errors import MapPruneError
from ..probes.layers import conv_layers, following_batchnorms
from .base import CleanData, Defense


def channel_lipschitz(conv: torch.nn.Conv2d, bn: torch.nn.BatchNorm2d) -> torch.Tensor:
    """(C_out,) UCLC of each output channel of ``conv`` as ``bn`` scales it."""
    w = conv.weight.detach().float()
    sigma_max = torch.linalg.matrix_norm(w.flatten(2), ord=2)  # (C_out,) largest singular value per filter
    gamma = bn.weight.detach().float()
    std = bn.running_var.detach().float().add(bn.eps).sqrt() if bn.running_var is not None else 1.0
    return sigma_max * (gamma / std).abs()


class CLP(Defense):
    """Channel Lipschitzness-based Pruning with threshold ``u`` (the paper's and BackdoorBench's 3)."""

    name = "clp"
    score_label = "upper bound of the channel Lipschitz constant"

    def __init__(self, *, u: float = 3.0, **kw):
        super().__init__(**kw)
        if u < 0:
            raise MapPruneError(f"u must be >= 0, got {u}")
        self.u = u

    def _repair(self, model, data: CleanData, device):
        t0 = time.perf_counter()
        convs = conv_layers(model)
        # One image only traces which BatchNorm reads which conv; CLP itself uses no data.
        bns = following_batchnorms(model, data.x[:1].to(device).float() / 255)
        if not bns:
            raise MapPruneError("no BatchNorm2d reads a conv's output directly; CLP needs conv + BatchNorm pairs")
        modules = dict(model.named_modules())
        scores, pruned = {}, {}
        with torch.no_grad():
            for name, bn_name in bns.items():
                conv, bn = convs[name], modules[bn_name]
                if bn.weight is None:  # a BatchNorm without affine parameters has nothing to zero
                    continue
                uclc = channel_lipschitz(conv, bn).cpu()
                scores[name] = uclc
                cut = torch.nonzero(uclc > uclc.mean() + self.u * uclc.std()).flatten()
                if len(cut) == 0:
                    continue
                pruned[name] = cut.tolist()
                idx = cut.to(bn.weight.device)
                bn.weight[idx] = 0.0
                bn.bias[idx] = 0.0
        skipped = [n for n in convs if n not in bns]
        return self.result(model, {"prune": time.perf_counter() - t0}, pruned=pruned, scores=scores,
                           extra={"batchnorm_of": bns, "skipped_convs": skipped})
