"""How much faster does keeping freed memory (``mapprune/allocator.py``, which the command line sets at start) make
training and FMT's testing phase, against glibc's default?

Each workload runs in a fresh process, alternately with the allocator kept as the command line sets it and with
glibc's default (``MAPPRUNE_ALLOCATOR=system``), ``--repeats`` times each; the best time of each is compared, with
the time spent in the kernel (page faults) and the peak resident memory. Each row names whether the worker really
kept freed memory (off glibc both say no, and the speed-up is noise).

Workloads, on an untrained PreActResNet18 (``--width``, CIFAR-sized inputs, one thread):
- ``train``: ``--steps`` steps of the training loop's work (batch 128, channels_last, autocast where the CPU has
  bf16, SGD);
- ``probe``: FMT's paper probe (mse) over every ``--layer-stride``-th layer, ``--images`` images (the testing phase
  of ``fmt_recipe_cost.py``).

    python benchmarks/allocator.py [--repeats 2] [--workloads train,probe] [--width 16] [--steps 20] [--images 32]
"""

import argparse
import json
import os
import subprocess
import sys

WORKLOADS = ("train", "probe")

WORKER = r"""
import json, resource, sys, time, torch
from mapprune.allocator import keep_freed_memory
kept = keep_freed_memory()
torch.set_num_threads(1)
torch.manual_seed(0)
from mapprune.models import create_model
work, p = sys.argv[1], json.loads(sys.argv[2])
model = create_model("preactresnet18", 10, width=p["width"])
if work == "train":
    from mapprune.device import autocast
    model = model.to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.rand(128, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.arange(128) % 10
    def run():
        for _ in range(p["steps"]):
            with autocast(torch.device("cpu")):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
else:
    from mapprune.probes import map_layers, probe_maps
    x = torch.randint(0, 256, (p["images"], 3, 32, 32), dtype=torch.uint8)
    y = torch.arange(p["images"]) % 10
    layers = list(map_layers(model))[::p["layer_stride"]]
    def run():
        probe_maps(model, x, y, {"mse": 0.06}, layers=layers, keep_probs=True)
t0, k0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_stime
run()
print(json.dumps({"kept": kept, "s": time.perf_counter() - t0,
                  "kernel_s": resource.getrusage(resource.RUSAGE_SELF).ru_stime - k0,
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def once(work: str, system: bool, params: dict) -> dict:
    """One fresh worker process: the workload's time, kernel time, peak memory and whether freed memory was kept."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "MAPPRUNE_ALLOCATOR"}
    if system:
        env["MAPPRUNE_ALLOCATOR"] = "system"
    out = subprocess.run([sys.executable, "-c", WORKER, work, json.dumps(params)], env=env, capture_output=True,
                         text=True)
    if out.returncode:
        raise SystemExit(f"the {work} worker failed:\n{out.stderr.strip()}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=2, help="fresh processes per allocator and workload (best kept)")
    ap.add_argument("--workloads", default="train,probe", help=f"comma-separated, of: {', '.join(WORKLOADS)}")
    ap.add_argument("--width", type=int, default=16, help="PreActResNet18's first-stage channels")
    ap.add_argument("--steps", type=int, default=20, help="training steps of the train workload")
    ap.add_argument("--images", type=int, default=32, help="images of the probe workload")
    ap.add_argument("--layer-stride", type=int, default=4, help="the probe workload tests every Nth layer")
    args = ap.parse_args(argv)
    works = args.workloads.split(",")
    unknown = [w for w in works if w not in WORKLOADS]
    if unknown:
        ap.error(f"unknown workload {unknown[0]!r}; valid: {', '.join(WORKLOADS)}")
    if min(args.repeats, args.width, args.steps, args.images, args.layer_stride) < 1:
        ap.error("--repeats, --width, --steps, --images and --layer-stride must be >= 1")
    params = {"width": args.width, "steps": args.steps, "images": args.images, "layer_stride": args.layer_stride}
    print("| workload | allocator | freed memory kept | best s | kernel s | peak MB |")
    print("|---|---|---|---|---|---|")
    results = {}
    for work in works:
        runs = {True: [], False: []}
        for _ in range(args.repeats):
            for system in (True, False):  # alternated, so both see the same load on a shared machine
                runs[system].append(once(work, system, params))
        best = {system: min(r, key=lambda d: d["s"]) for system, r in runs.items()}
        for system, label in ((True, "glibc default"), (False, "as the command line sets it")):
            b = best[system]
            print(f"| {work} | {label} | {'yes' if b['kept'] else 'no'} | {b['s']:.3f} | {b['kernel_s']:.3f} | "
                  f"{b['peak_mb']:.0f} |")
        speedup = best[True]["s"] / best[False]["s"]
        print(f"| {work} | speed-up | | {speedup:.2f}x | | |", flush=True)
        results[work] = {"system": best[True], "kept": best[False], "speedup": speedup}
    return results


if __name__ == "__main__":
    main()
