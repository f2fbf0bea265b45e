"""Which is faster on this machine: `mapprune bench --jobs 2 --threads 1` or `--jobs 1 --threads 2`, on the same
cells?

Each setting runs the whole grid from scratch into its own temporary folder; the two settings alternate
(A B B A ...) so a slow phase of a shared machine falls on both. Prints the wall time of every repeat, each
setting's median and the ratio. Run it on a quiet machine: both settings want every core.

    python benchmarks/bench_jobs.py [--grid benchmarks/grids/digits-tiny.toml] [--repeats 2] [--data-dir DIR]
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETTINGS = {"jobs 2 x 1 thread": ["--jobs", "2", "--threads", "1"],
            "jobs 1 x 2 threads": ["--jobs", "1", "--threads", "2"]}


def run_grid(grid: str, args: list[str], data_dir: str | None) -> float:
    """Wall seconds of one `mapprune bench` of the whole grid into a fresh temporary folder."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "mapprune", "bench", grid, "--out", str(Path(tmp) / "out"), "--no-progress",
               *args, *(["--data-dir", data_dir] if data_dir else [])]
        t0 = time.perf_counter()
        done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wall = time.perf_counter() - t0
        if done.returncode:
            raise SystemExit(f"{' '.join(cmd)} failed (exit {done.returncode}):\n{done.stderr.strip()}")
        return wall


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--grid", default="benchmarks/grids/digits-tiny.toml", help="a bench grid file")
    ap.add_argument("--repeats", type=int, default=2, help="runs of the grid per setting (the median is compared)")
    ap.add_argument("--data-dir", help="dataset folder for the grid's cells")
    a = ap.parse_args(argv)
    if a.repeats < 1:
        ap.error(f"--repeats must be >= 1, got {a.repeats}")
    if not Path(a.grid).is_file():
        ap.error(f"no grid file {a.grid}")
    print(f"grid {a.grid}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at the start")
    walls = {name: [] for name in SETTINGS}
    order = list(SETTINGS)
    for r in range(a.repeats):
        for name in order if r % 2 == 0 else order[::-1]:
            wall = run_grid(a.grid, SETTINGS[name], a.data_dir)
            walls[name].append(wall)
            print(f"repeat {r}: {name}: {wall:.2f} s", flush=True)
    med = {name: statistics.median(w) for name, w in walls.items()}
    for name, m in med.items():
        print(f"{name}: median {m:.2f} s")
    a_name, b_name = order
    print(f"throughput {a_name} / {b_name}: {med[b_name] / med[a_name]:.2f}x")
    return walls


if __name__ == "__main__":
    main()
