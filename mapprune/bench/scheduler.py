"""``run_bench``: runs the missing cells of a grid, each once its model is done, on one of the engines; records
failures, sets damaged cells aside, and writes the results of what is done."""

import json
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ..errors import MapPruneError, unknown_name
from ..runs import atomic_write_text
from .engines import BACKENDS, InlineEngine, LocalEngine, RayEngine, sigterm_raises
from .folder import claim, locked, set_aside
from .grid import Grid, load_grid
from .plan import Cell, plan, select
from .results import write_results


def run_bench(grid_path, out, *, jobs: int = 1, threads: int | None = None, backend: str = "local",
              address: str | None = None, retry_failed: bool = False, update: bool = False,
              adopt_only: bool = False, only: list[str] | None = None, progress: bool = True, log=print) -> dict:
    """Runs every missing cell of the grid into ``out``; returns {"cells", "done", "failed", "ran"}.
    ``adopt_only``: computes nothing; adopts the runs and the finished defense results that match cells exactly
    (``adopt_defenses``) and writes the table of what is done (the other cells stay missing).
    ``only``: attack labels; runs (and counts) only the cells of those attacks, with the keys and folders they have
    in the whole grid, and writes the results of every cell of the grid that is done.

    One bench at a time writes ``out`` (a second fails at once, naming the first). SIGTERM (raised as
    :class:`~mapprune.bench.engines.Terminated`) and ^C (KeyboardInterrupt) stop the worker processes before they
    propagate; rerunning the same command finishes the missing cells."""
    if backend not in BACKENDS:
        raise unknown_name("backend", backend, BACKENDS)
    if jobs < 1 or (threads is not None and threads < 1):
        raise MapPruneError(f"--jobs and --threads must be >= 1, got {jobs} and {threads}")
    grid = load_grid(grid_path)
    out = Path(out)
    every = plan(grid, out)
    cells = select(every, grid, only)
    with sigterm_raises(), locked(out):
        claim(out, grid, Path(grid_path), update)
        return _run_cells(cells, every, grid, out, jobs=jobs, threads=threads, backend=backend, address=address,
                          retry_failed=retry_failed, adopt_only=adopt_only, progress=progress, log=log)


def _run_cells(cells: list[Cell], every: list[Cell], grid: Grid, out: Path, *, jobs: int, threads: int | None,
               backend: str, address: str | None, retry_failed: bool, adopt_only: bool, progress: bool, log) -> dict:
    """The scheduler of :func:`run_bench`, run under the folder's lock: runs ``cells``, then writes the results of
    ``every`` cell of the grid that is done."""
    failed_dir = out / "failed"
    by_key = {c.key: c for c in cells}
    state = {}
    for c in cells:  # models first: a damaged model's folder, set aside, takes its defense cells with it
        obj, problem = c.verify()
        if obj is not None:
            state[c.key] = "done"
            continue
        if problem:
            set_aside(c, out, problem)
        if (failed_dir / f"{c.key}.json").is_file() and not retry_failed:
            state[c.key] = "failed"
        else:
            state[c.key] = "pending"
    if retry_failed and len(cells) == len(every):  # the whole grid: every record goes
        shutil.rmtree(failed_dir, ignore_errors=True)
    elif retry_failed:  # some attacks only: their records go, the others' stay
        for c in cells:
            (failed_dir / f"{c.key}.json").unlink(missing_ok=True)
    t0 = time.perf_counter()
    ran = []

    def show(event: str = "") -> None:
        counts = {s: sum(1 for v in state.values() if v == s)
                  for s in ("done", "running", "failed", "blocked", "skipped")}
        log(f"[bench {_clock(time.perf_counter() - t0)}] {counts['done']}/{len(cells)} done, {counts['running']} "
            f"running, {counts['failed']} failed" + (f", {counts['blocked']} blocked" if counts["blocked"] else "")
            + (f", {counts['skipped']} not adopted" if counts["skipped"] else "") + (f" | {event}" if event else ""))

    def finish(c: Cell, res: dict) -> None:
        if res.get("skipped"):
            state[c.key] = "skipped"
            return
        ran.append(c.key)
        if res["ok"]:
            state[c.key] = "done"
            show(f"finished {c.label} ({res['seconds']:.0f} s)")
        else:
            state[c.key] = "failed"
            failed_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(failed_dir / f"{c.key}.json", json.dumps({"cell": asdict(c), **res}, indent=1))
            show(f"FAILED {c.label}: {res['error']}")

    def ready() -> list[Cell]:
        out_cells = []
        for c in cells:
            if state[c.key] != "pending":
                continue
            deps = [state[d] for d in c.deps]
            if "skipped" in deps:
                state[c.key] = "skipped"
            elif any(d in ("failed", "blocked") for d in deps):
                state[c.key] = "blocked"
            elif all(d == "done" for d in deps):
                out_cells.append(c)
        return out_cells

    show("start")
    inline = backend == "local" and jobs == 1
    engine = (InlineEngine() if inline else
              LocalEngine(jobs, threads) if backend == "local" else RayEngine(jobs, threads, address))
    cell_progress = progress and inline and sys.stderr.isatty()
    try:
        if inline:
            if threads:
                torch.set_num_threads(threads)
            while todo := ready():
                c = todo[0]
                state[c.key] = "running"
                show(f"started {c.label}")
                finish(c, engine.submit(asdict(c), grid, None, cell_progress, adopt_only))
        else:
            running = {}
            while True:
                for c in ready():
                    if len(running) >= jobs:
                        break
                    state[c.key] = "running"
                    running[engine.submit(asdict(c), grid, threads, False, adopt_only)] = c
                    show(f"started {c.label}")
                if not running:
                    break
                for f, res in engine.wait(running):
                    finish(running.pop(f), res)
    except BaseException:  # SIGTERM, ^C or an error: no worker runs on
        engine.close(abort=True)
        raise
    engine.close()
    write_results(every, grid, out)
    show("results written to " + str(out))
    failed = [by_key[k].label for k, v in state.items() if v in ("failed", "blocked")]
    return {"cells": len(cells), "done": sum(v == "done" for v in state.values()), "failed": failed, "ran": ran}


def _clock(s: float) -> str:
    return f"{int(s // 3600)}:{int(s % 3600 // 60):02d}:{int(s % 60):02d}"
