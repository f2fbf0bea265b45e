"""What keeping freed memory (``mapprune/allocator.py``, set by the command line at start) buys, side by side.

Each workload runs in a fresh process, alternately with the allocator kept as the command line sets it and with
glibc's default (``MAPPRUNE_ALLOCATOR=system``), ``--repeats`` times each; the best time of each is compared, with
the time spent in the kernel (page faults) and the peak resident memory.

Workloads, on an untrained PreActResNet18 (width 16, CIFAR-sized inputs, one thread):
- ``train``: 20 steps of the training loop's work (batch 128, channels_last, autocast where the CPU has bf16, SGD);
- ``probe``: FMT's paper probe (mse) over every 4th layer, 32 images (the testing phase of ``fmt_recipe_cost.py``).

    python benchmarks/allocator.py [--repeats 2] [--workloads train,probe]
"""

import argparse
import json
import os
import subprocess
import sys

WORKER = r"""
import json, resource, sys, time, torch
from mapprune.allocator import keep_freed_memory
kept = keep_freed_memory()
torch.set_num_threads(1)
torch.manual_seed(0)
from mapprune.models import create_model
model = create_model("preactresnet18", 10, width=16)
work = sys.argv[1]
if work == "train":
    from mapprune.device import autocast
    model = model.to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.rand(128, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.arange(128) % 10
    def run():
        for _ in range(20):
            with autocast(torch.device("cpu")):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
else:
    from mapprune.probes import map_layers, probe_maps
    x = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8)
    y = torch.arange(32) % 10
    layers = list(map_layers(model))[::4]
    def run():
        probe_maps(model, x, y, {"mse": 0.06}, layers=layers, keep_probs=True)
t0, k0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_stime
run()
print(json.dumps({"kept": kept, "s": time.perf_counter() - t0,
                  "kernel_s": resource.getrusage(resource.RUSAGE_SELF).ru_stime - k0,
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def once(work: str, system: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "MAPPRUNE_ALLOCATOR"}
    if system:
        env["MAPPRUNE_ALLOCATOR"] = "system"
    out = subprocess.run([sys.executable, "-c", WORKER, work], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--workloads", default="train,probe")
    args = ap.parse_args()
    print("| workload | allocator | best s | kernel s | peak MB |")
    print("|---|---|---|---|---|")
    for work in args.workloads.split(","):
        runs = {True: [], False: []}
        for _ in range(args.repeats):
            for system in (True, False):  # alternated, so both see the same load on a shared machine
                runs[system].append(once(work, system))
        best = {system: min(r, key=lambda d: d["s"]) for system, r in runs.items()}
        for system, label in ((True, "glibc default"), (False, "freed memory kept")):
            b = best[system]
            print(f"| {work} | {label} | {b['s']:.1f} | {b['kernel_s']:.1f} | {b['peak_mb']:.0f} |")
        print(f"| {work} | speed-up | {best[True]['s'] / best[False]['s']:.2f}x | | |", flush=True)


if __name__ == "__main__":
    main()
