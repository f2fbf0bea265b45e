"""FP, Fine-Pruning (Liu, Dolan-Gavitt & Garg, RAID 2018).

1. The mean activation of each channel of the last feature map (what the global pooling hands the classifier)
   over the clean fitting split, test transform.
2. Prune the least active ("dormant") channels, ``step`` of them at a time (1% of the channels), while the
   held-out clean accuracy stays within ``max_drop`` (relative) of the unpruned model's; keep the last step
   that did (BackdoorBench keeps one step past it, and decides on *test* accuracy).
3. Fine-tune the whole model on the clean subset with the shared fine-tune, the pruned channels kept at zero.

Pruning a channel of the pooled feature map is exactly zeroing that column of the linear classifier, so the
pruned model is an ordinary checkpoint of the same architecture (no pruning re-parametrisation in the file).
"""

import copy
import math
import time

import torch
from torch import nn

from ..errors import MapPruneError
from .base import CleanData, FineTuning, most_aggressive


def classifier_head(model: nn.Module) -> tuple[str, nn.Linear]:
    """The last nn.Linear: the classifier that reads the pooled feature map."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise MapPruneError("FP needs a linear classifier reading pooled feature maps; the model has no nn.Linear")
    return linears[-1]


@torch.no_grad()
def head_inputs(model: nn.Module, head: nn.Linear, x: torch.Tensor, batch: int = 512) -> torch.Tensor:
    """(N, C) what the classifier reads for uint8 images x (eval mode)."""
    device = next(model.parameters()).device
    feats = []
    handle = head.register_forward_pre_hook(lambda mod, inputs: feats.append(inputs[0].detach().float().cpu()))
    was = model.training
    model.eval()
    try:
        for i in range(0, len(x), batch):
            model(x[i:i + batch].to(device).float().div_(255).contiguous(memory_format=torch.channels_last))
    finally:
        handle.remove()
        model.train(was)
    out = torch.cat(feats)
    if out.ndim != 2:
        raise MapPruneError(f"FP expects the classifier to read pooled (N, C) features, it reads {tuple(out.shape)}")
    return out


class ColumnMask:
    """Keeps the pruned columns of the classifier at zero through fine-tuning (an ``after_step`` hook)."""

    def __init__(self, head: nn.Linear, channels: torch.Tensor):
        self.head, self.channels = head, channels

    @torch.no_grad()
    def __call__(self, model=None):
        self.head.weight[:, self.channels.to(self.head.weight.device)] = 0.0


class FinePruning(FineTuning):
    """Fine-Pruning: prune dormant last-layer channels (amount chosen on held-out accuracy), then fine-tune."""

    name = "fp"
    score_label = "mean clean activation"

    def __init__(self, *, step_ratio: float = 0.01, max_drop: float = 0.1, **kw):
        super().__init__(**kw)
        if not 0 < step_ratio < 1:
            raise MapPruneError(f"step_ratio must be in (0, 1), got {step_ratio}")
        if not 0 <= max_drop < 1:
            raise MapPruneError(f"max_drop is a relative accuracy drop in [0, 1), got {max_drop}")
        self.step_ratio, self.max_drop = step_ratio, max_drop

    def _repair(self, model, data: CleanData, device):
        t0 = time.perf_counter()
        head_name, head = classifier_head(model)
        activation = head_inputs(model, head, data.fit[0]).mean(0)  # (C,)
        order = torch.argsort(activation, stable=True)  # least active first
        xs, ys = data.select
        if len(xs) == 0:
            raise MapPruneError("FP chooses how much to prune on held-out images; use held_out > 0")
        sel = head_inputs(model, head, xs)
        w, b = head.weight.detach().float().cpu(), head.bias.detach().float().cpu() if head.bias is not None else 0

        def acc_pruning(k):  # the classifier is linear: pruning k channels is dropping their columns
            keep = torch.ones(len(activation), dtype=torch.bool)
            keep[order[:k]] = False
            return float(((sel * keep) @ w.T + b).argmax(1).eq(ys).float().mean())

        step = max(1, math.ceil(self.step_ratio * len(activation)))
        acc0 = acc_pruning(0)
        k, tried = most_aggressive(range(step, len(activation), step), acc_pruning, acc0, self.max_drop)
        k = k or 0
        channels = order[:k]
        teacher = copy.deepcopy(model) if self.distill > 0 else None  # the model as it came in, unpruned
        mask = ColumnMask(head, channels)
        mask()
        timings = {"prune": time.perf_counter() - t0}
        t0 = time.perf_counter()
        history = self.finetune(model, data.x, data.y, after_step=mask, device=device, teacher=teacher)
        timings["finetune"] = time.perf_counter() - t0
        return self.result(model, timings, pruned={head_name: sorted(channels.tolist())} if k else {},
                           scores={head_name: activation}, history=history,
                           extra={"recipe": self.recipe, "sweep": [[0, round(acc0, 6)]] +
                                  [[kk, round(a, 6)] for kk, a in tried]})
