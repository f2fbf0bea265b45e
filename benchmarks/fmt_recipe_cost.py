"""What does FMT's testing phase cost per recipe? Timed side by side on one model: the paper's (one ``mse`` probe)
against the recommended recipe's probes (patch, plus the warp and smooth fields that give unlearning candidates)
shared in one pass, as FMT runs them (the fields judged on ``field_images`` of the test images), the same pass with
the fields judged on every test image, and, with ``--apart``, one probe after another.

The recommended recipe also runs the stimulation test (``probes/stimulation.py``: every map set to a high
value, 30 class-balanced images, level 4; detection only), timed on the same layers and added to the shared pass.

The recommended testing phase is meant to cost at most 2x the paper's. Times are wall-clock on this machine;
ratios are what to read (the three are measured back to back on the same images and layers). The allocator is set
as the command line sets it (``allocator.keep_freed_memory``); ``--system-allocator`` leaves glibc's default, to
see what that costs.

    python benchmarks/fmt_recipe_cost.py [--run RUN] [--width 16] [--n 32] [--layer-stride 1]
                                         [--system-allocator] [--apart] [--data-dir DIR]
"""

import argparse
import resource
import time

import torch

from mapprune.allocator import keep_freed_memory
from mapprune.defenses.base import pick_images
from mapprune.defenses.fmt import FMT_RECIPES
from mapprune.models import create_model
from mapprune.probes import map_layers, probe_maps, stimulate_maps

RECOMMENDED = {"patch": 0.06, "warp": 1.0, "smooth": 0.06}
FIELD_IMAGES = FMT_RECIPES["recommended"]["field_images"]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", help="a run folder (its model and training images); default: an untrained "
                                  "PreActResNet18 on CIFAR-sized random images")
    ap.add_argument("--data-dir", help="dataset folder of the run (default: $MAPPRUNE_DATA)")
    ap.add_argument("--width", type=int, default=16, help="the untrained model's width (without --run)")
    ap.add_argument("--n", type=int, default=32, help="test images (both recipes use 32)")
    ap.add_argument("--layer-stride", type=int, default=1, help="time every Nth layer only (totals cover those)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--system-allocator", action="store_true",
                    help="leave glibc's malloc as it is (the command line keeps freed memory: allocator.py)")
    ap.add_argument("--apart", action="store_true", help="also time the three probes one after another")
    args = ap.parse_args(argv)
    if min(args.width, args.n, args.layer_stride, args.threads) < 1:
        ap.error("--width, --n, --layer-stride and --threads must be >= 1")
    torch.set_num_threads(args.threads)
    kept = False if args.system_allocator else keep_freed_memory()
    if args.run:
        from mapprune.runs import load_run

        r = load_run(args.run, data_dir=args.data_dir)
        model, x, y = r.model, r.dataset.x_train[:args.n], r.dataset.y_train[:args.n]
        xs, ys = pick_images(r.dataset.x_train[:5000], r.dataset.y_train[:5000], 30, 0, balanced=True)
    else:
        torch.manual_seed(0)
        model = create_model("preactresnet18", 10, width=args.width)
        x, y = torch.randint(0, 256, (args.n, 3, 32, 32), dtype=torch.uint8), torch.arange(args.n) % 10
        xs, ys = torch.randint(0, 256, (30, 3, 32, 32), dtype=torch.uint8), torch.arange(30) % 10
    layers = list(map_layers(model))[::args.layer_stride]
    maps = sum(map_layers(model)[n].out_channels for n in layers)
    print(f"{len(layers)} layers, {maps} maps, {args.n} images, {torch.get_num_threads()} thread(s), "
          f"allocator: {'freed memory kept' if kept else 'system default'}\n")

    def timed(probes, judged=None):
        t, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_stime
        probe_maps(model, x, y, probes, layers=layers, keep_probs=True, judged_images=judged)
        kernel[0] += resource.getrusage(resource.RUSAGE_SELF).ru_stime - before
        return time.perf_counter() - t

    kernel = [0.0]

    paper = timed({"mse": 0.06})
    fields = {o: FIELD_IMAGES for o in RECOMMENDED if o != "patch"} if FIELD_IMAGES else None
    shared = timed(RECOMMENDED, fields)
    every = timed(RECOMMENDED)
    apart = sum(timed({o: e}) for o, e in RECOMMENDED.items()) if args.apart else None
    t = time.perf_counter()
    stimulate_maps(model, xs, ys, level=4.0, layers=layers)
    stim = time.perf_counter() - t
    m = min(FIELD_IMAGES, args.n) if FIELD_IMAGES else args.n
    rows = {"paper (one mse probe)": paper,
            f"recommended probes (patch, warp, smooth in one pass; fields judged on {m} images)": shared,
            f"the same, fields judged on all {args.n} images": every}
    if apart is not None:
        rows["recommended probes, one pass each"] = apart
    rows["stimulation test"] = stim
    rows["recommended as `defend fmt` runs it, with the stimulation test"] = shared + stim
    print("| testing phase | time | vs paper |")
    print("|---|---|---|")
    for name, seconds in rows.items():
        print(f"| {name} | {seconds:.2f} s | {seconds / paper:.2f}x |")
    print(f"\ntime in the kernel during the probes: {kernel[0]:.2f} s (page faults of fresh allocations)")
    return rows


if __name__ == "__main__":
    main()
