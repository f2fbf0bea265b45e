"""FT: fine-tuning alone, with exactly FMT's data, schedule and loop, so the effect of pruning is isolated."""

import copy
import time

from .base import Defense, DefenseResult


class FineTune(Defense):
    name = "ft"

    def _repair(self, model, x, y, device):
        t0 = time.perf_counter()
        teacher = copy.deepcopy(model) if self.distill > 0 else None
        history = self.finetune(model, x, y, device=device, teacher=teacher)
        return DefenseResult(model, self.name, self.params(), {"finetune": time.perf_counter() - t0},
                             history=history, extra={"recipe": self.recipe})
