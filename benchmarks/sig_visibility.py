"""Why can no trigger search see SIG on a small model? On each run folder given (a SIG model and clean models of the
same architecture), three measurements, the first with the real trigger (an evaluation, never part of a defense):

- the stripes' reach: the share of non-target test images that SIG's own stripes (``--frequency``) send to the
  target at each amplitude of ``--deltas`` (grey levels), on the backdoored model and on the clean ones;
- for each class, a universal perturbation of L-inf size ``--eps`` searched on half of a 10% clean training subset
  to send the other classes' images there, its success measured on the other half: free (one value per pixel) and
  shaped like stripes (one value per column, the same on every row and channel).

A searched perturbation that sends images to every class as easily as the stripes send them to the target leaves a
detector nothing to single out: the backdoor is weaker than the model's own adversarial directions.

    python benchmarks/sig_visibility.py SIG_RUN CLEAN_RUN [CLEAN_RUN ...] [--eps 0.03,0.06,0.08] [--data-dir DIR]
"""

import argparse
from pathlib import Path

import torch

from mapprune.attacks.reactivation import perturbed, universal_perturbation
from mapprune.attacks.sig import sinusoid
from mapprune.data import clean_subset
from mapprune.errors import MapPruneError
from mapprune.metrics import predict
from mapprune.runs import load_run


def floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"a comma-separated list of numbers, got {text!r}") from None


def target_rate(model, images: torch.Tensor, target: int) -> float:
    return float((predict(model, images) == target).float().mean())


def class_reach(model, x: torch.Tensor, y: torch.Tensor, num_classes: int, eps: float, shape, steps: int
                ) -> list[float]:
    """For each class c: the share of held-out images of other classes that one universal perturbation, searched
    on the other half of the images, sends to c."""
    half = torch.arange(len(x)) % 2 == 0
    reach = []
    for c in range(num_classes):
        search, held = x[half & (y != c)], x[~half & (y != c)]
        delta = universal_perturbation(model, search, torch.full((len(search),), c), eps=eps, steps=steps,
                                       shape=shape)
        reach.append(target_rate(model, perturbed(held, delta), c))
    return reach


def main(argv=None) -> dict:
    """Prints the measurements; returns them: {run name: {"stripes": {delta: reach}, "searched": {(kind, eps):
    [reach per class]}}}."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run folders: a SIG model first, then clean models")
    ap.add_argument("--frequency", type=float, default=None, help="the stripes' frequency (default: the SIG run's)")
    ap.add_argument("--deltas", type=floats, default=[8, 15, 20, 30, 40], help="stripe amplitudes in grey levels")
    ap.add_argument("--eps", type=floats, default=[0.03, 0.06, 0.08], help="L-inf sizes of the searched perturbations")
    ap.add_argument("--steps", type=int, default=60, help="signed-gradient steps of each search (default 60)")
    ap.add_argument("--data-dir", default=None, help="where the datasets are (default: mapprune's)")
    args = ap.parse_args(argv)
    if args.steps < 1 or not all(0 < e <= 1 for e in args.eps) or not all(0 <= d <= 255 for d in args.deltas):
        ap.error("--steps must be >= 1, each --eps in (0, 1] and each --deltas in [0, 255]")
    try:
        runs = [load_run(r, args.data_dir) for r in args.runs]  # every folder checked before any search
    except MapPruneError as e:
        ap.error(str(e))
    attack = runs[0].manifest.get("attack") or {}
    if attack.get("name") != "sig":
        ap.error(f"{args.runs[0]} is not a SIG model (its attack: {attack.get('name')}); give the SIG model first")
    target = int(attack["target"])
    frequency = args.frequency if args.frequency is not None else float(attack["frequency"])
    found = {}
    for path, run in zip(args.runs, runs):
        ds = run.dataset
        test = ds.x_test[torch.as_tensor(ds.y_test) != target]
        width = test.shape[-1]
        stripes = {d: target_rate(run.model, perturbed(test, sinusoid(width, d, frequency)), target)
                   for d in args.deltas}
        print(f"{path.name}: stripes (f={frequency:g}) to class {target}: "
              + ", ".join(f"delta {d:g} ({d / 255:.3f}) {100 * r:.1f}%" for d, r in stripes.items()))
        idx = clean_subset(ds.y_train, 0.1, 0)
        x, y = ds.x_train[idx], torch.as_tensor(ds.y_train[idx])
        searched = {}
        for eps in args.eps:
            for kind, shape in (("free", None), ("stripes", (1, 1, width))):
                r = searched[kind, eps] = class_reach(run.model, x, y, ds.num_classes, eps, shape, args.steps)
                others = sorted(v for c, v in enumerate(r) if c != target)
                print(f"  {kind:7s} eps {eps:g}: class {target} {100 * r[target]:.1f}%, the others "
                      f"{100 * others[0]:.1f}-{100 * others[-1]:.1f}% (median {100 * others[len(others) // 2]:.1f})",
                      flush=True)
        found[path.name] = {"stripes": stripes, "searched": searched}
    return found


if __name__ == "__main__":
    main()
