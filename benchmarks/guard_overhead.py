"""What does an input guard cost in front of a model? GuardedModel's time per image beside the bare model's.

Each detector is fitted and calibrated on the defender's clean images (the clean subset of the training set, split
80/20 as `mapprune guard` splits it), then the bare model and the guarded one classify the same clean test images
in batches, alternately, in one process; the fastest of ``--repeats`` rounds counts for each. Without ``--run`` the
model is mapprune's clean small CNN of the embedded digits (trained once, ``--epochs`` epochs, then cached).

    python benchmarks/guard_overhead.py [--run RUN] [--detectors NAME ...] [--images 256] [--repeats 3] [--threads N]
"""

import argparse
import platform
import time

import torch

from mapprune.clean_model import clean_model
from mapprune.data import clean_subset, load_dataset, split_holdout
from mapprune.device import pick_device
from mapprune.errors import MapPruneError
from mapprune.guard import INPUT_DETECTORS, GuardedModel, create_detector
from mapprune.runs import load_run


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(fn, batches, device) -> float:
    sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        for xb in batches:
            fn(xb)
    sync(device)
    return time.perf_counter() - start


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", help="a run folder: its model and data (default: a clean small CNN on the digits)")
    ap.add_argument("--detectors", nargs="+", default=list(INPUT_DETECTORS), metavar="NAME",
                    help=f"detectors to time (default: all of {', '.join(INPUT_DETECTORS)})")
    ap.add_argument("--images", type=int, default=256, help="clean test images classified per round")
    ap.add_argument("--batch-size", type=int, default=256, help="images per call of the model or the guarded model")
    ap.add_argument("--repeats", type=int, default=3, help="rounds; the fastest counts")
    ap.add_argument("--fpr", type=float, default=0.05, help="the false-positive rate the thresholds are set at")
    ap.add_argument("--clean-ratio", type=float, default=0.1, help="the clean share of the training set the detectors "
                    "are fitted and calibrated on (the time per image does not depend on it; a CIFAR-10 run's 10%% "
                    "takes STRIP and TeCo minutes to calibrate on a CPU)")
    ap.add_argument("--epochs", type=int, default=12, help="training epochs of the default digits model")
    ap.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    ap.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    args = ap.parse_args(argv)
    if min(args.images, args.batch_size, args.repeats, args.epochs, args.threads or 1) < 1:
        ap.error("--images, --batch-size, --repeats, --epochs and --threads must be >= 1")
    if not 0 < args.clean_ratio <= 1:
        ap.error("--clean-ratio is a share of the training set, in (0, 1]")
    if args.threads:
        torch.set_num_threads(args.threads)
    unknown = [d for d in args.detectors if d not in INPUT_DETECTORS]
    if unknown:
        ap.error(f"unknown detector {unknown[0]!r}; valid: {', '.join(INPUT_DETECTORS)}")
    try:
        device = pick_device(args.device)
        if args.run:
            run = load_run(args.run)
            model, ds, what = run.model, run.dataset, args.run
        else:
            ds = load_dataset("digits")
            model = clean_model(ds, model="smallcnn", width=32, epochs=args.epochs, progress=False)
            what = f"clean smallcnn on the digits (epochs: {args.epochs})"
    except MapPruneError as e:
        ap.error(str(e))
    model = model.to(device).eval()
    fit, cal = split_holdout(clean_subset(ds.y_train, args.clean_ratio, 0), ds.y_train, 0.2, 0)
    x = ds.x_test[:args.images].float().div(255)
    batches = [x[i:i + args.batch_size].to(device) for i in range(0, len(x), args.batch_size)]
    print(f"{what}: {len(x)} clean test images in batches of {args.batch_size}, fastest of {args.repeats} rounds; "
          f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, device {device}")
    print("| detector | passes/image | bare ms/image | guarded ms/image | guarded / bare |\n|---|---|---|---|---|")
    results = {}
    for name in args.detectors:
        guarded = GuardedModel.build(model, create_detector(name), ds.x_train[fit], ds.y_train[fit], ds.x_train[cal],
                                     fpr=args.fpr)
        guarded(batches[0])  # warm-up: the first calls allocate
        model(batches[0])
        bare_s, guarded_s = [], []
        for _ in range(args.repeats):  # alternated, so a busy moment of the machine falls on both
            bare_s.append(seconds(model, batches, device))
            guarded_s.append(seconds(guarded, batches, device))
        b, gd = 1000 * min(bare_s) / len(x), 1000 * min(guarded_s) / len(x)
        results[name] = {"forward_passes": guarded.forward_passes, "bare_ms": b, "guarded_ms": gd}
        print(f"| {name} | {guarded.forward_passes} | {b:.4f} | {gd:.4f} | {gd / b:.2f}x |")
    return results


if __name__ == "__main__":
    main()
