"""Running one cell, in the bench process, a worker process or a Ray task: a model cell trains a backdoored model
(``mapprune attack``) or copies an adopted run; a defense cell runs ``mapprune defend`` on its model."""

import shutil
import time
import traceback
from pathlib import Path

import torch

from ..allocator import keep_freed_memory
from ..errors import MapPruneError
from ..jobs.attack import attack_run
from ..jobs.cleanse import cleanse
from ..jobs.defend import NothingToAdopt, defend_run
from ..jobs.guard import guard
from ..jobs.relapse import relapse
from ..runs import atomic_write_text, json_text
from .grid import Grid, relapse_settings
from .plan import MEASUREMENTS, Cell


def run_cell(cell: dict, grid: Grid, threads: int | None, progress: bool, adopt_only: bool = False) -> dict:
    """Does one cell's work; returns {"key", "ok", "seconds", "error"} ("skipped": True where ``adopt_only`` found
    nothing to adopt and did nothing). Never raises."""
    t0 = time.perf_counter()
    try:
        keep_freed_memory()  # a spawned worker does not inherit the command line's setting
        if threads:
            torch.set_num_threads(threads)
        c = Cell(**cell)
        if c.kind == "model":
            if adopt_only and not c.settings.get("source"):
                raise NothingToAdopt(f"{c.label} is trained, not adopted")
            _run_model(c, grid, progress)
        elif c.kind in MEASUREMENTS:
            if adopt_only:
                raise NothingToAdopt(f"{c.label} is measured, not adopted")
            {"relapse": _run_relapse, "cleanse": _run_cleanse, "guard": _run_guard}[c.kind](c, grid, progress)
        else:
            _run_defense(c, grid, progress, adopt_only)
        return {"key": c.key, "ok": True, "seconds": time.perf_counter() - t0, "error": None}
    except NothingToAdopt as e:
        return {"key": cell["key"], "ok": False, "skipped": True, "seconds": time.perf_counter() - t0,
                "error": str(e)}
    except BaseException as e:  # recorded, so one failed cell never stops the others
        if isinstance(e, KeyboardInterrupt):
            raise
        detail = str(e) if isinstance(e, MapPruneError) else traceback.format_exc()
        return {"key": cell["key"], "ok": False, "seconds": time.perf_counter() - t0,
                "error": f"{type(e).__name__}: {e}", "detail": detail}


def _run_model(c: Cell, grid: Grid, progress: bool) -> None:
    if c.settings.get("source"):
        run = Path(c.path)
        partial = run.with_name(run.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(c.settings["source"], partial, ignore=shutil.ignore_patterns("defense", "diagnose"))
        partial.rename(run)
        return
    s = c.settings
    model_kw = dict(s["model"])
    eval_every = model_kw.pop("eval_every", 1)
    attack_run(s["attack"], Path(c.path), dataset=s["dataset"], data_dir=grid.data_dir, preset=s["preset"],
               target=s["target"], all_to_all=s["all_to_all"], poison_ratio=s["poison_ratio"], seed=s["train_seed"],
               progress=progress, eval_every=eval_every, attack_kw=s["opts"], **model_kw)


def _run_defense(c: Cell, grid: Grid, progress: bool, adopt_only: bool = False) -> None:
    s = c.settings
    path = Path(c.path)
    defend_run(path.parent.parent, s["defense"], clean_ratio=s["clean_ratio"], name=path.name,
               data_dir=grid.data_dir, progress=progress, seed=s["seed"], adopt_from=s.get("adopt_from"),
               adopt_only=adopt_only, **s["opts"])


def _run_relapse(c: Cell, grid: Grid, progress: bool) -> None:
    s = c.settings
    retuning, reactivation, seeds = relapse_settings(s["relapse"])
    report = relapse(s["run"], defense=s["defense"], control=s["control_run"], settings=retuning,
                     reactivation=reactivation, seeds=tuple(seeds), data_dir=grid.data_dir, progress=progress)
    # the key marks relapse.json as this cell's: a report made by hand or with other settings is redone
    atomic_write_text(c.marker(), json_text({**report, "bench_key": c.key}, indent=1))


def _run_cleanse(c: Cell, grid: Grid, progress: bool) -> None:
    t = c.settings["cleanse"]
    results = cleanse(c.path, detectors=t.get("detectors", ["all"]), expected=t.get("expected", 0.1),
                      layer=t.get("layer", "penultimate"), data_dir=grid.data_dir)
    summary = {name: {k: r.get(k) for k in ("rule", "flagged", "evaluation", "suspected_target")}
               for name, r in results.items()}
    atomic_write_text(c.marker(), json_text({"kind": "cleanse-bench", "bench_key": c.key, "detectors": summary},
                                            indent=1))


def _run_guard(c: Cell, grid: Grid, progress: bool) -> None:
    t = c.settings["guard"]
    out = guard(c.path, detectors=t.get("detectors", ["all"]), fpr=t.get("fpr", 0.05),
                test_images=t.get("test_images"), data_dir=grid.data_dir, log=None)
    summary = {name: {k: r[k] for k in ("all", "effective", "cost", "threshold")}
               for name, r in out["detectors"].items()}
    atomic_write_text(c.marker(), json_text({"kind": "guard-bench", "bench_key": c.key, "detectors": summary},
                                            indent=1))
