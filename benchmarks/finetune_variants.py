"""Fine-tune variants on one run, measured on its full test sets (how the recommended recipe's fine-tune was
chosen; docs/fmt.md, "What the recommended recipe adds").

    python benchmarks/finetune_variants.py RUN [--prune] SPEC [SPEC ...]

A SPEC is comma-separated Defense keyword arguments, e.g. ``lr=0.02,epochs=15`` or ``recipe=paper`` or
``distill=1.0``. Without ``--prune`` each SPEC is plain fine-tuning (FT); with it, the maps the recommended FMT
selects (probed once, seed 0) are pruned and masked first, so only the fine-tune differs between SPECs.
"""

import argparse
import copy
import json
import time

import torch

from mapprune.data import clean_subset
from mapprune.defenses import FMT
from mapprune.defenses.pruning import prune
from mapprune.metrics import evaluate
from mapprune.runs import load_run


def parse(spec: str) -> dict:
    out = {}
    for kv in filter(None, spec.split(",")):
        k, _, v = kv.partition("=")
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("specs", nargs="+")
    ap.add_argument("--prune", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    r = load_run(args.run)
    idx = clean_subset(r.dataset.y_train, 0.1, 0)
    x, y = r.dataset.x_train[idx], r.dataset.y_train[idx]
    tests = r.test_sets()
    print("before", {k: round(100 * v, 2) for k, v in evaluate(r.model, tests).items()}, flush=True)
    pruned = None
    if args.prune:
        probe = FMT(epochs=0)
        pruned = probe.choose(probe.probe(r.model, x, y).acc)
    for spec in args.specs:
        d = FMT(hflip=r.dataset.hflip, **parse(spec))
        m = copy.deepcopy(r.model)
        mask = prune(m, pruned, x[:1].float() / 255) if pruned else None
        t0 = time.perf_counter()
        d.finetune(m, x, y, after_step=mask, teacher=copy.deepcopy(r.model))
        after = {k: round(100 * v, 2) for k, v in evaluate(m, tests).items()}
        print(spec, "pruned+masked" if pruned else "FT", after, f"{time.perf_counter() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
