"""Do the adaptive attacks hide a backdoor from FMT on the embedded digits? The adaptive attacks and a two-trigger
model (seconds per model) against FMT (recommended recipe, the demo's digits settings) and FT, with what each
regulariser changes (the largest per-map trigger response, FMT's largest target pull and its suspected target). The
CIFAR-10 grid is benchmarks/grids/cifar10-adaptive.toml.

    python benchmarks/adaptive_digits.py [--out DIR] [--models badnets,distributed,fmt-evasive,multi]

The models are trained into ``--out`` (a temporary folder by default) and reused when the folder already holds them.
"""

import argparse
import tempfile
from pathlib import Path

import torch

from mapprune.data import clean_subset
from mapprune.defenses import create_defense
from mapprune.defenses.fmt import FMT
from mapprune.jobs.attack import attack_run
from mapprune.jobs.diagnose import trigger_response
from mapprune.metrics import evaluate
from mapprune.probes import class_pull, estimate_target
from mapprune.runs import load_run

PATCH2 = {"base_opts": {"patch_size": 2}}  # BadNets' default on 8x8 digits is a single pixel
MODELS = {"badnets": {"patch_size": 2}, "distributed": PATCH2, "fmt-evasive": PATCH2,
          "multi": {"triggers": "badnets:0:patch_size=2,blended:5:alpha=0.3"}}
DIGITS = {"hflip": False, "batch_size": 32, "fraction": 1 / 8, "distill": 0.0}  # the demo's settings


def pct(m: dict) -> str:
    """ACC / ASR / RA in %, and a several-trigger model's ASR per trigger in braces."""
    triggers = m.get("triggers") or {}
    per = " {" + ", ".join(f"{100 * v['asr']:.1f}" for v in triggers.values()) + "}" if triggers else ""
    return f"{100 * m['acc']:.2f} / {100 * m['asr']:.2f} / {100 * m['ra']:.2f}{per}"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="folder of the trained models (default: a new temporary folder)")
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated, of: " + ", ".join(MODELS))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    names = args.models.split(",")
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        ap.error(f"unknown model {unknown[0]!r}; valid: {', '.join(MODELS)}")
    if args.threads < 1:
        ap.error(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    out = args.out or Path(tempfile.mkdtemp(prefix="adaptive-digits-"))
    print(f"models in {out}; ACC / ASR / RA in %\n")
    print("| model | undefended | largest trigger response (z) | FMT pull, suspected (anomaly) | FMT | FT |")
    print("|---|---|---|---|---|---|")
    for name in names:
        kw = MODELS[name]
        run = out / name
        if not (run / "manifest.json").is_file():
            attack_run(name, run, dataset="digits", preset="demo", progress=False, attack_kw=kw)
        r = load_run(run)
        x, y = r.dataset.x_test, r.dataset.y_test
        xc = x[y != r.attack.target][:200]
        shift = max(float(v.max()) for v in trigger_response(r.model, xc, r.attack.apply(xc)).values())
        test = FMT(fraction=0.125).probe(r.model, r.dataset.x_train[:500], r.dataset.y_train[:500])
        pull = float(class_pull(test)[:, r.attack.target].max())
        guess = estimate_target(test)
        idx = clean_subset(r.dataset.y_train, 0.1, 0)
        xs, ys = r.dataset.x_train[idx], r.dataset.y_train[idx]
        fmt = evaluate(FMT(**DIGITS).repair(r.model, xs, ys).model, r.test_sets())
        ft = evaluate(create_defense("ft", hflip=False, batch_size=32, distill=0.0).repair(r.model, xs, ys).model,
                      r.test_sets())
        print(f"| {name} | {pct(evaluate(r.model, r.test_sets()))} | {shift:.2f} | {pull:.3f}, class "
              f"{guess['target']} ({guess['anomaly_index']:.1f}) | {pct(fmt)} | {pct(ft)} |", flush=True)


if __name__ == "__main__":
    main()
