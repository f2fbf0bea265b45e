"""FT: fine-tuning alone, with exactly FMT's data, schedule and loop, so the effect of pruning is isolated."""

import copy
import time

from .base import CleanData, FineTuning


class FineTune(FineTuning):
    name = "ft"

    def _repair(self, model, data: CleanData, device):
        t0 = time.perf_counter()
        teacher = copy.deepcopy(model) if self.distill > 0 else None
        history = self.finetune(model, data.x, data.y, device=device, teacher=teacher)
        return self.result(model, {"finetune": time.perf_counter() - t0}, history=history,
                           extra={"recipe": self.recipe})
