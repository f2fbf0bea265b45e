"""``mapprune bench GRID --out DIR``: an attack x defense x seed grid as one resumable, parallel job.

A grid is a TOML file (see ``benchmarks/grids/``)::

    name = "digits-tiny"
    dataset = "digits"          # any --dataset; data_dir = "..." optional (else --data-dir / $MAPPRUNE_DATA)
    preset = "demo"             # training preset of the backdoored models; [model] overrides its values
    clean_ratio = 0.1           # the defenders' clean share (optional; the protocol's default otherwise)
    seeds = [0, 1]              # defense seeds (the clean subset and every random choice of a defense)

    [[attack]]
    name = "badnets"            # poison_ratio, target, all_to_all, train_seed and opts = {...} optional;
                                # run = "path" adopts a finished run folder instead of training one;
                                # adopt_defenses = true also adopts its defense results whose settings match
                                # a cell's exactly (result.json says "adopted_from")
    [[defense]]
    name = "fmt"
    opts = {recipe = "paper"}   # any option of the defense; clean_ratio = 0.05 overrides the grid's
    sweep = {eps = [0.02, 0.1], clean_ratio = [0.02]}   # optional: one more cell per value, one setting
                                # changed at a time from opts (a sensitivity analysis: figures/sweep-*.png)

A grid may name published numbers to print beside its own: ``reference = "path.toml"`` (relative to the grid
file; see ``benchmarks/reference/``), a table of ACC / ASR / RA in % per attack and defense label::

    name = "BackdoorBench leaderboard, CIFAR-10, PreActResNet-18"
    [cells]
    badnets = {none = [91.32, 95.03, 4.67], nc = [89.05, 1.27, 89.16]}

It changes no cell: table.md gains the same tables filled with the published numbers, for the attacks and
defenses the grid has.

Every cell (one backdoored model, or one defense on one model with one seed) is keyed by a stable hash of its
full settings and written as an ordinary run folder: ``DIR/runs/<attack>-<hash>/`` (readable by ``eval``,
``defend``, ``report``) and its ``defense/<variant>-<hash>[-seedN]/``. A cell whose folder is complete is never
recomputed; a changed setting is a new cell. Failures are recorded in ``DIR/failed/`` and do not stop the other
cells. The results: ``DIR/results.csv``, ``DIR/table.md`` and ``DIR/figures/``.

Faults: one bench at a time writes DIR (an OS lock beside it, ``.DIR.lock``: a second bench fails at once naming
the first, and a killed one leaves nothing locked). SIGTERM and ^C stop the worker processes (exit status 143 and
130); rerunning the same command finishes what is missing. Every file the bench writes is written atomically. A
cell counts as complete only when its files verify; a damaged cell's folder is moved to ``DIR/damaged/`` and the
cell is run again. A grid that would run one cell twice (a repeated seed, two identical attacks or defenses) is
refused before any work.
"""

import csv
import hashlib
import inspect
import io
import json
import os
import shutil
import signal
import statistics
import sys
import threading
import time
import tomllib
import traceback
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..allocator import keep_freed_memory
from ..errors import MapPruneError, MapPruneWarning, unknown_name
from ..runs import acquire_folder_lock, atomic_write_text, read_manifest

BACKENDS = ("local", "ray")
GRID_KEYS = {"name", "dataset", "data_dir", "preset", "clean_ratio", "seeds", "model", "attack", "defense",
             "reference"}
# What only changes how results are shown: not part of the grid's identity (bench.json's hash).
PRESENTATION_KEYS = {"reference", "_reference"}
ATTACK_KEYS = {"name", "opts", "poison_ratio", "target", "all_to_all", "train_seed", "run", "label", "adopt_defenses",
               "model"}
DEFENSE_KEYS = {"name", "opts", "label", "clean_ratio", "sweep"}
MODEL_KEYS = {"model", "width", "epochs", "batch_size", "lr", "schedule", "eval_every"}


def _hash(settings: dict) -> str:
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def _resolved_params(defense: str, opts: dict, dataset: str) -> dict:
    """Every hyperparameter the defense will run with (its recipe's and the dataset's defaults, then the grid's
    options): hashed into the cell's key, so a default changed in the code (a new recommended recipe) makes a new
    cell instead of passing off a result of the old one as current."""
    from ..defenses import defense_class

    cls = defense_class(defense)
    out = {**cls.defaults(opts.get("recipe")), **cls.dataset_defaults.get(dataset, {}), **opts}
    return {k: v for k, v in out.items() if k not in ("seed", "progress")}


@dataclass
class Cell:
    """One unit of work: ``kind`` "model" (train or adopt a backdoored model) or "defense"."""

    kind: str
    label: str  # attack label, or "attack label / defense label / seed N"
    key: str
    settings: dict
    path: str  # the run folder (model) or the defense folder (defense)
    deps: list[str] = field(default_factory=list)
    attack: str = ""
    defense: str = ""
    seed: int | None = None

    def marker(self) -> Path:
        """The file that says the cell is finished: manifest.json (model) or result.json (defense)."""
        return Path(self.path) / ("manifest.json" if self.kind == "model" else "result.json")

    def verify(self) -> tuple[dict | None, str | None]:
        """(the marker's content, None) when the cell's files verify: the marker parses as a JSON object and a
        model cell's model.safetensors exists. Otherwise (None, what is wrong), or (None, None) when the cell's
        folder does not exist (not run yet)."""
        folder, marker = Path(self.path), self.marker()
        if not folder.exists():
            return None, None
        try:
            obj = json.loads(marker.read_text())
        except FileNotFoundError:
            return None, f"{marker} is missing"
        except (OSError, ValueError) as e:  # ValueError: JSONDecodeError, UnicodeDecodeError
            return None, f"{marker} is not valid JSON ({e})"
        if not isinstance(obj, dict):
            return None, f"{marker} is not a JSON object"
        if self.kind == "model" and not (folder / "model.safetensors").is_file():
            return None, f"{folder / 'model.safetensors'} is missing"
        return obj, None

    def done(self) -> bool:
        """True when the cell's files verify (:meth:`verify`): a damaged cell is not done, and is rerun."""
        return self.verify()[0] is not None


# -- the grid ------------------------------------------------------------------------------------------------

def load_grid(path) -> dict:
    """Reads and validates a grid file; every attack, defense and option is checked here, before any work."""
    path = Path(path)
    grid = _read_toml(path, f"grid file {path} not found")
    _only(grid, GRID_KEYS, f"{path}")
    for k in ("name", "dataset"):
        if not isinstance(grid.get(k), str) or not grid[k]:
            raise MapPruneError(f"{path}: the grid needs a {k!r} (a string)")
    _only(grid.get("model", {}), MODEL_KEYS, f"{path} [model]")
    seeds = grid.setdefault("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise MapPruneError(f"{path}: seeds must be a non-empty list of non-negative integers, got {seeds!r}")
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise MapPruneError(f"{path}: seeds = {seeds!r} repeats {', '.join(map(str, repeated))}; give each seed once")
    if not grid.get("attack"):
        raise MapPruneError(f"{path}: a grid needs at least one [[attack]]")
    grid.setdefault("defense", [])  # a grid of models only (a population) trains its models and stops
    _expand_sweeps(grid, path)
    _check_names(grid, path)
    _check_duplicates(grid, path)
    grid.pop("_shape", None)
    if "reference" in grid:
        if not isinstance(grid["reference"], str) or not grid["reference"]:
            raise MapPruneError(f"{path}: reference must be the path of a TOML file of published numbers")
        grid["_reference"] = load_reference(path.parent / grid["reference"])
    return grid


def _read_toml(path: Path, missing: str) -> dict:
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise MapPruneError(missing) from None
    except tomllib.TOMLDecodeError as e:
        raise MapPruneError(f"{path} is not valid TOML: {e}") from None


def load_reference(path) -> dict:
    """Published numbers to print beside a grid's own: {"name", "cells": {attack: {defense: [acc, asr, ra]}}},
    percentages as written in the file (validated here, before any work)."""
    path = Path(path)
    ref = _read_toml(path, f"reference file {path} not found (a grid's reference is relative to the grid file)")
    _only(ref, {"name", "source", "note", "cells"}, f"{path}")
    if not isinstance(ref.get("name"), str) or not ref["name"]:
        raise MapPruneError(f"{path}: a reference needs a 'name' (a string) saying whose numbers these are")
    cells = ref.get("cells")
    if not isinstance(cells, dict) or not cells:
        raise MapPruneError(f"{path}: a reference needs a [cells] table: attack = {{defense = [ACC, ASR, RA]}}")
    for attack, row in cells.items():
        if not isinstance(row, dict):
            raise MapPruneError(f"{path}: cells.{attack} must be a table of defense = [ACC, ASR, RA]")
        for defense, v in row.items():
            if (not isinstance(v, list) or len(v) != 3 or
                    not all(isinstance(x, int | float) and not isinstance(x, bool) and 0 <= x <= 100 for x in v)):
                raise MapPruneError(f"{path}: cells.{attack}.{defense} must be [ACC, ASR, RA], three percentages "
                                    f"in 0..100, got {v!r}")
    return {"name": ref["name"], "cells": cells}


def _expand_sweeps(grid: dict, path) -> None:
    """Each ``sweep = {option = [values]}`` of a [[defense]] becomes one more [[defense]] per value, that one option
    changed from the entry's own settings; ``grid["_sweeps"]`` remembers which entries form each curve."""
    from ..defenses import create_defense
    from .defend import DEFAULT_CLEAN_RATIO

    expanded, sweeps = [], []
    for i, d in enumerate(grid["defense"]):
        sweep = d.pop("sweep", None)
        expanded.append(d)
        if sweep is None:
            continue
        where = f"{path} [[defense]] #{i + 1}"
        if not isinstance(sweep, dict) or not sweep or not all(isinstance(v, list) and v for v in sweep.values()):
            raise MapPruneError(f"{where}: sweep is a table of option = [values], e.g. sweep = {{eps = [0.02, 0.1]}}")
        if "label" in d:
            raise MapPruneError(f"{where}: a swept defense is labelled by its settings; drop label")
        opts = dict(d.get("opts", {}))
        try:
            params = create_defense(d["name"], **opts).params()
        except MapPruneError as e:
            raise MapPruneError(f"{where}: {e}") from None
        ratio = d.get("clean_ratio", grid.get("clean_ratio", DEFAULT_CLEAN_RATIO.get(grid["dataset"], 0.1)))
        base = _defense_label(d)
        for param, values in sweep.items():
            if param != "clean_ratio" and param not in params:
                raise MapPruneError(f"{where}: {d['name']} has no option {param!r} to sweep; valid: "
                                    f"{', '.join(sorted(params))}, clean_ratio")
            default = ratio if param == "clean_ratio" else params[param]
            points = [(default, base)]
            for v in values:
                if v == default:
                    continue
                entry = {"name": d["name"], "opts": opts, "clean_ratio": v} if param == "clean_ratio" else \
                    {"name": d["name"], "opts": {**opts, param: v}, **({"clean_ratio": d["clean_ratio"]}
                                                                     if "clean_ratio" in d else {})}
                if param != "clean_ratio":
                    try:  # each swept value is refused here, before any cell runs, as the defense would refuse it
                        create_defense(d["name"], **entry["opts"])
                    except MapPruneError as e:
                        raise MapPruneError(f"{where}: sweep {param} = {v!r}: {e}") from None
                expanded.append(entry)
                points.append((v, entry.get("label") or _defense_label(entry)))
            try:
                points.sort(key=lambda p: p[0])
            except TypeError:  # a default of None (e.g. FMT's budget: the rank rule's count) stays first
                pass
            sweeps.append({"defense": base, "param": param, "points": points})
    grid["defense"] = expanded
    if sweeps:
        grid["_sweeps"] = sweeps


def _only(table: dict, allowed: set, where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise MapPruneError(f"{where}: unknown key {unknown[0]!r}; valid keys: {', '.join(sorted(allowed))}")


def _check_names(grid: dict, path) -> None:
    from ..attacks import ATTACKS, load_plugins
    from ..data import DATASETS
    from ..defenses import DEFENSES, create_defense
    from ..models import MODELS
    from ..presets import PRESETS

    load_plugins()

    if grid["dataset"] not in DATASETS:
        raise unknown_name("dataset", grid["dataset"], DATASETS)
    if grid.get("preset") is not None and grid["preset"] not in PRESETS:
        raise unknown_name("preset", grid["preset"], PRESETS)
    if grid.get("model", {}).get("model") not in (None, *MODELS):
        raise unknown_name("model", grid["model"]["model"], MODELS)
    labels = set()
    for i, a in enumerate(grid["attack"]):
        where = f"{path} [[attack]] #{i + 1}"
        _only(a, ATTACK_KEYS, where)
        if not isinstance(a.get("model", {}), dict):
            raise MapPruneError(f"{where}: model is a table of training settings, e.g. model = {{model = \"vgg16_bn\"}}")
        _only(a.get("model", {}), MODEL_KEYS, f"{where} model")
        if "run" in a and "model" in a:
            raise MapPruneError(f"{where}: an adopted run keeps its own model; drop model")
        if a.get("model", {}).get("model") not in (None, *MODELS):
            raise unknown_name("model", a["model"]["model"], MODELS)
        if a.get("name") not in ATTACKS and "run" not in a:
            raise MapPruneError(f"{where}: unknown attack {a.get('name')!r}; valid attacks: {', '.join(ATTACKS)}")
        if "run" in a and not (Path(a["run"]) / "manifest.json").is_file():
            raise MapPruneError(f"{where}: {a['run']} is not a finished run folder (no manifest.json)")
        if a.get("adopt_defenses") and "run" not in a:
            raise MapPruneError(f"{where}: adopt_defenses adopts the defense results of an adopted run; give run = "
                                "\"path\" too")
        if "run" not in a:
            valid = _attack_options(ATTACKS[a["name"]])
            for k in a.get("opts", {}):
                if k not in valid:
                    raise MapPruneError(f"{where}: attack {a['name']} has no option {k!r} (target, poison_ratio and "
                                        f"all_to_all are keys of [[attack]] itself); valid: {', '.join(valid)}")
            _try_attack(grid, a, where)
        label = _attack_label(a)
        if label in labels:
            raise MapPruneError(f"{where}: two attacks are labelled {label!r}; give one a distinct label = \"...\"")
        labels.add(label)
    labels = set()
    for i, d in enumerate(grid["defense"]):
        where = f"{path} [[defense]] #{i + 1}"
        _only(d, DEFENSE_KEYS, where)
        if d.get("name") not in DEFENSES:
            raise MapPruneError(f"{where}: unknown defense {d.get('name')!r}; valid defenses: {', '.join(DEFENSES)}")
        if "seed" in d.get("opts", {}):
            raise MapPruneError(f"{where}: give defense seeds with the grid's seeds = [...], not as an option")
        try:
            create_defense(d["name"], **d.get("opts", {}))
        except MapPruneError as e:
            raise MapPruneError(f"{where}: {e}") from None
        label = _defense_label(d)
        if label in labels:
            raise MapPruneError(f"{where}: two defenses are labelled {label!r}; give one a distinct label")
        labels.add(label)


def _check_duplicates(grid: dict, path) -> None:
    """Two attacks, or two defenses, whose settings are identical (whatever their labels) would be one cell twice:
    refused, naming both."""
    seen: dict = {}
    for a in grid["attack"]:
        key = _hash(_model_settings(grid, a)[0])
        if key in seen:
            raise MapPruneError(f"{path}: attacks {seen[key]!r} and {_attack_label(a)!r} have identical settings "
                                "(one model twice); drop one")
        seen[key] = _attack_label(a)
    seen = {}
    for d in grid["defense"]:
        key = _hash({"defense": d["name"], "opts": d.get("opts", {}),
                     "clean_ratio": d.get("clean_ratio", grid.get("clean_ratio"))})
        if key in seen:
            raise MapPruneError(f"{path}: defenses {seen[key]!r} and {_defense_label(d)!r} have identical settings "
                                "(one defense twice); drop one")
        seen[key] = _defense_label(d)


def _try_attack(grid: dict, a: dict, where: str) -> None:
    """Builds the attack once (no training), so a bad option value fails now, not after other cells ran."""
    from ..attacks import create_attack
    from ..data import load_dataset

    if "_shape" not in grid:
        ds = load_dataset(grid["dataset"], grid.get("data_dir"))
        grid["_shape"] = (ds.image_shape, ds.num_classes)
    shape, classes = grid["_shape"]
    try:
        create_attack(a["name"], shape, classes, target=a.get("target", 0), poison_ratio=a.get("poison_ratio", 0.1),
                      all_to_all=a.get("all_to_all", False), **a.get("opts", {}))
    except MapPruneError as e:
        raise MapPruneError(f"{where}: {e}") from None
    except (TypeError, ValueError) as e:
        raise MapPruneError(f"{where}: bad option value for attack {a['name']}: {e}") from None


def _attack_options(cls) -> list[str]:
    """The attack's own keyword-only options over its class chain (the base's target / ratio are grid keys)."""
    names = []
    for c in cls.__mro__:
        if "__init__" in vars(c):
            names += [k for k, p in inspect.signature(c.__init__).parameters.items()
                      if p.kind is inspect.Parameter.KEYWORD_ONLY and k not in names]
    return [k for k in names if k not in ("target", "poison_ratio", "all_to_all", "clean_label")]


def _defense_label(d: dict) -> str:
    from ..defenses import defense_class

    if d.get("label"):
        return d["label"]
    ratio = f"-ratio{d['clean_ratio']:g}" if "clean_ratio" in d else ""
    return defense_class(d["name"]).variant_name(dict(d.get("opts", {}))) + ratio


def _attack_label(a: dict) -> str:
    return a.get("label") or a.get("name") or Path(a["run"]).name


def _model_settings(grid: dict, a: dict) -> tuple[dict, str]:
    """(the settings that key an attack's model cell, the dataset it was trained on)."""
    if "run" in a:
        m = read_manifest(Path(a["run"]))
        settings = {"adopt": {k: m.get(k) for k in ("attack", "model", "train", "seed")},
                    "dataset": m["dataset"]["fingerprint"]}
        return settings, m["dataset"]["name"]
    model_kw = {**grid.get("model", {}), **a.get("model", {})}  # an attack's own [model] keys win
    settings = {"dataset": grid["dataset"], "preset": grid.get("preset"), "model": model_kw,
                "attack": a["name"], "opts": a.get("opts", {}), "poison_ratio": a.get("poison_ratio", 0.1),
                "target": a.get("target", 0), "all_to_all": a.get("all_to_all", False),
                "train_seed": a.get("train_seed", 0)}
    return settings, grid["dataset"]


def plan(grid: dict, out: Path) -> list[Cell]:
    """Every cell of the grid, models first, each defense cell depending on its model."""
    cells = []
    for a in grid["attack"]:
        label = _attack_label(a)
        settings, dataset = _model_settings(grid, a)
        key = _hash(settings)
        run = out / "runs" / f"{label}-{key}"
        model_cell = Cell("model", label, key, {**settings, "source": a.get("run")}, str(run), attack=label)
        cells.append(model_cell)
        for d in grid["defense"]:
            dlabel = _defense_label(d)
            for seed in grid["seeds"]:
                dset = {"model": key, "defense": d["name"], "opts": d.get("opts", {}),
                        "params": _resolved_params(d["name"], d.get("opts", {}), dataset),
                        "clean_ratio": d.get("clean_ratio", grid.get("clean_ratio"))}
                # The folder is named by the defense's settings alone, so one defense lines up across models.
                dkey = _hash({k: v for k, v in dset.items() if k != "model"})
                folder = f"{dlabel}-{dkey}" + (f"-seed{seed}" if seed else "")
                # Where finished results may be adopted from is not a setting: it is not hashed.
                adopt = {"adopt_from": a["run"]} if a.get("adopt_defenses") else {}
                cells.append(Cell("defense", f"{label} / {dlabel} / seed {seed}", _hash({**dset, "seed": seed}),
                                  {**dset, "seed": seed, **adopt}, str(run / "defense" / folder), [key],
                                  attack=label, defense=dlabel, seed=seed))
    return cells


# -- running one cell (in a worker process, or a Ray task) ----------------------------------------------------

def run_cell(cell: dict, grid: dict, threads: int | None, progress: bool, adopt_only: bool = False) -> dict:
    """Does one cell's work; returns {"key", "ok", "seconds", "error"} ("skipped": True where ``adopt_only`` found
    nothing to adopt and did nothing). Never raises."""
    from .defend import NothingToAdopt

    t0 = time.perf_counter()
    try:
        keep_freed_memory()  # a spawned worker does not inherit the command line's setting
        if threads:
            import torch

            torch.set_num_threads(threads)
        c = Cell(**cell)
        if c.kind == "model":
            if adopt_only and not c.settings.get("source"):
                raise NothingToAdopt(f"{c.label} is trained, not adopted")
            _run_model(c, grid, progress)
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


def _run_model(c: Cell, grid: dict, progress: bool) -> None:
    from .attack import attack_run

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
    attack_run(s["attack"], Path(c.path), dataset=s["dataset"], data_dir=grid.get("data_dir"), preset=s["preset"],
               target=s["target"], all_to_all=s["all_to_all"], poison_ratio=s["poison_ratio"], seed=s["train_seed"],
               progress=progress, eval_every=eval_every, attack_kw=s["opts"], **model_kw)


def _run_defense(c: Cell, grid: dict, progress: bool, adopt_only: bool = False) -> None:
    from .defend import defend_run

    s = c.settings
    path = Path(c.path)
    defend_run(path.parent.parent, s["defense"], clean_ratio=s["clean_ratio"], name=path.name,
               data_dir=grid.get("data_dir"), progress=progress, seed=s["seed"], adopt_from=s.get("adopt_from"),
               adopt_only=adopt_only, **s["opts"])


# -- scheduling -----------------------------------------------------------------------------------------------

def _worker_init(parent: int) -> None:
    """Runs first in each local worker process: ^C is left to the bench process (which stops its workers), and a
    worker whose bench process died (SIGKILL, out of memory) exits instead of running on unowned."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(1)

    threading.Thread(target=watch, name="bench-parent-watch", daemon=True).start()


class _Local:
    """--jobs N on the local backend: N spawned worker processes."""

    def __init__(self, jobs: int, threads: int | None):
        import concurrent.futures as cf
        import multiprocessing as mp

        self.cf = cf
        self.pool = cf.ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"),
                                           initializer=_worker_init, initargs=(os.getpid(),))

    def submit(self, *args):
        return self.pool.submit(run_cell, *args)

    def wait(self, running: dict) -> list:
        done, _ = self.cf.wait(list(running), return_when=self.cf.FIRST_COMPLETED)
        return [(f, f.result()) for f in done]

    def close(self, abort: bool = False) -> None:
        """Shuts the pool down; with ``abort`` (an interrupt or an error) it first terminates the worker
        processes, so no cell runs on after the bench stopped."""
        if abort:
            workers = list((self.pool._processes or {}).values())
            for p in workers:
                p.terminate()
            for p in workers:
                p.join(10)
                if p.is_alive():
                    p.kill()
                    p.join()
        self.pool.shutdown(wait=True, cancel_futures=True)


class _Ray:
    """--backend ray: one Ray task per cell."""

    def __init__(self, jobs: int, threads: int | None, address: str | None):
        try:
            import ray
        except ImportError:
            raise MapPruneError("--backend ray needs Ray: pip install 'mapprune[ray]'") from None
        self.ray = ray
        if not ray.is_initialized():
            bench_handler = signal.getsignal(signal.SIGTERM)
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
            if callable(bench_handler) and threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, bench_handler)  # ray.init installs SIGTERM handlers of its own
        self.remote = ray.remote(num_cpus=threads or 1)(run_cell)
        self.pending: set = set()

    def submit(self, *args):
        ref = self.remote.remote(*args)
        self.pending.add(ref)
        return ref

    def wait(self, running: dict) -> list:
        done, _ = self.ray.wait(list(running), num_returns=1)
        self.pending.difference_update(done)
        return [(f, self.ray.get(f)) for f in done]

    def close(self, abort: bool = False) -> None:
        """With ``abort``, cancels the tasks still running (force: their worker processes are killed)."""
        if abort:
            for ref in self.pending:
                try:
                    self.ray.cancel(ref, force=True)
                except Exception:  # already finished, or the cluster is gone
                    pass
        self.pending.clear()


class _Inline:
    """--jobs 1 on the local backend: cells run in this process (their own progress bars show)."""

    def submit(self, *args):
        return run_cell(*args)

    def close(self, abort: bool = False) -> None:
        pass


class Terminated(KeyboardInterrupt):
    """SIGTERM received while a bench runs: it stops the bench as ^C does (the CLI exits with status 143)."""


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """While the bench runs, SIGTERM raises :class:`Terminated` in the main thread, so the bench stops its workers
    on the way out; left alone where the process has a SIGTERM handler of its own or this is not the main thread.
    A second SIGTERM during the cleanup is ignored."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL):
        yield
        return

    received = []

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        received.append(signum)
        raise Terminated()

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    except KeyboardInterrupt as e:
        if received and not isinstance(e, Terminated):  # a library (Ray) turned it into a plain KeyboardInterrupt
            raise Terminated() from e
        raise
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextmanager
def _locked(out: Path) -> Iterator[None]:
    """Holds the write lock of ``out`` (an OS lock beside it, which the kernel drops when the process dies, even by
    SIGKILL): a second bench on the same folder fails at once with one line naming this one."""
    lock = acquire_folder_lock(out.resolve(), "bench")  # one lock for every spelling of the folder
    try:
        yield
    finally:
        lock.release()


def run_bench(grid_path, out, *, jobs: int = 1, threads: int | None = None, backend: str = "local",
              address: str | None = None, retry_failed: bool = False, update: bool = False,
              adopt_only: bool = False, progress: bool = True, log=print) -> dict:
    """Runs every missing cell of the grid into ``out``; returns {"cells", "done", "failed", "ran"}.
    ``adopt_only``: computes nothing; adopts the runs and the finished defense results that match cells exactly
    (``adopt_defenses``) and writes the table of what is done (the other cells stay missing).

    One bench at a time writes ``out`` (a second fails at once, naming the first). SIGTERM (raised as
    :class:`Terminated`) and ^C (KeyboardInterrupt) stop the worker processes before they propagate; rerunning the
    same command finishes the missing cells."""
    if backend not in BACKENDS:
        raise unknown_name("backend", backend, BACKENDS)
    if jobs < 1 or (threads is not None and threads < 1):
        raise MapPruneError(f"--jobs and --threads must be >= 1, got {jobs} and {threads}")
    grid = load_grid(grid_path)
    out = Path(out)
    cells = plan(grid, out)
    with _sigterm_raises(), _locked(out):
        _claim(out, grid, Path(grid_path), update)
        return _run_cells(cells, grid, out, jobs=jobs, threads=threads, backend=backend, address=address,
                          retry_failed=retry_failed, adopt_only=adopt_only, progress=progress, log=log)


def _run_cells(cells: list[Cell], grid: dict, out: Path, *, jobs: int, threads: int | None, backend: str,
               address: str | None, retry_failed: bool, adopt_only: bool, progress: bool, log) -> dict:
    """The scheduler of :func:`run_bench`, run under the folder's lock."""
    failed_dir = out / "failed"
    by_key = {c.key: c for c in cells}
    state = {}
    for c in cells:  # models first: a damaged model's folder, set aside, takes its defense cells with it
        obj, problem = c.verify()
        if obj is not None:
            state[c.key] = "done"
            continue
        if problem:
            _set_aside(c, out, problem)
        if (failed_dir / f"{c.key}.json").is_file() and not retry_failed:
            state[c.key] = "failed"
        else:
            state[c.key] = "pending"
    if retry_failed:
        shutil.rmtree(failed_dir, ignore_errors=True)
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
    engine = _Inline() if inline else (_Local(jobs, threads) if backend == "local" else _Ray(jobs, threads, address))
    cell_progress = progress and inline and sys.stderr.isatty()
    try:
        if inline:
            if threads:
                import torch

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
    write_results(cells, grid, out)
    show("results written to " + str(out))
    failed = [by_key[k].label for k, v in state.items() if v in ("failed", "blocked")]
    return {"cells": len(cells), "done": sum(v == "done" for v in state.values()), "failed": failed, "ran": ran}


def _set_aside(c: Cell, out: Path, problem: str) -> None:
    """Moves a damaged cell's folder under ``out/damaged/`` (kept to look at, out of the results), so the cell is
    run again, and says so."""
    folder = Path(c.path)
    try:
        dest = out / "damaged" / folder.relative_to(out)
    except ValueError:
        dest = out / "damaged" / folder.name
    base, n = dest, 1
    while dest.exists():
        dest, n = base.with_name(f"{base.name}.{n}"), n + 1
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(folder, dest)
    warnings.warn(f"{problem}: {c.label} is run again (its folder was moved to {dest})", MapPruneWarning,
                  stacklevel=3)


def _clock(s: float) -> str:
    return f"{int(s // 3600)}:{int(s % 3600 // 60):02d}:{int(s % 60):02d}"


def _claim(out: Path, grid: dict, grid_path: Path, update: bool) -> None:
    """DIR/bench.json names the grid that made DIR; another grid is refused unless ``update``, and so is a damaged
    bench.json (``update`` rewrites it)."""
    out.mkdir(parents=True, exist_ok=True)
    meta = out / "bench.json"
    digest = _hash({k: v for k, v in grid.items() if k not in PRESENTATION_KEYS})
    if meta.is_file():
        try:
            old = json.loads(meta.read_text())
            if not isinstance(old, dict) or not isinstance(old.get("grid_hash"), str):
                raise ValueError("not an object with a grid_hash string")
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            if not update:
                raise MapPruneError(f"{meta} is damaged ({e}); pass --update to rewrite it from this grid (the "
                                    "finished cells are kept)") from None
            old = {"grid_hash": digest}
        if old["grid_hash"] != digest and not update:
            raise MapPruneError(f"{out} was made by grid {old.get('name')!r} with other settings; pass --update to "
                                "add this grid's cells to it (unchanged cells are kept), or choose another --out")
    elif any(p for p in out.iterdir()):
        raise MapPruneError(f"{out} is not empty and was not made by mapprune bench; choose another --out")
    atomic_write_text(meta, json.dumps({"name": grid["name"], "grid_hash": digest, "grid": grid}, indent=1))
    atomic_write_text(out / "grid.toml", grid_path.read_bytes())


# -- results ----------------------------------------------------------------------------------------------------

def _triggers(metrics: dict) -> str:
    """A several-trigger model's ASR and RA per trigger, as JSON ({label: {"asr", "ra"}}); "" for one trigger."""
    return json.dumps(metrics["triggers"]) if metrics.get("triggers") else ""


def collect(cells: list[Cell]) -> list[dict]:
    """One row per finished cell: settings, metrics before and after (and per trigger where a model has several),
    DER, wall time per phase, peak memory. A damaged cell (files that do not verify, or lack a field) is left out
    with a warning naming its file."""
    rows = []
    for c in cells:
        obj, problem = c.verify()
        if obj is None:
            if problem:
                warnings.warn(f"{problem}: {c.label} is left out of the results (rerun the bench to redo it)",
                              MapPruneWarning, stacklevel=2)
            continue
        try:
            rows.append(_row(c, obj))
        except (KeyError, TypeError, ValueError) as e:
            warnings.warn(f"{c.marker()} lacks an expected field or value ({type(e).__name__}: {e}): {c.label} is "
                          "left out of the results", MapPruneWarning, stacklevel=2)
    return rows


def _row(c: Cell, obj: dict) -> dict:
    """The results row of a finished cell, from its manifest.json (model) or result.json (defense)."""
    if c.kind == "model":
        m = obj
        return {"attack": c.attack, "defense": "none", "seed": None, "key": c.key, "path": c.path,
                "acc": m["metrics"]["acc"], "asr": m["metrics"]["asr"], "ra": m["metrics"]["ra"],
                "triggers": _triggers(m["metrics"]),
                "acc_before": None, "asr_before": None, "ra_before": None, "der": None,
                "wall_s": m["timings"].get("train_s"), "timings": json.dumps(m["timings"]),
                "peak_memory_mb": m.get("peak_memory_mb"), "settings": json.dumps(c.settings),
                "adopted_from": c.settings.get("source"), "diverged": None}
    r = obj
    return {"attack": c.attack, "defense": c.defense, "seed": c.seed, "key": c.key, "path": c.path,
            "acc": r["after"]["acc"], "asr": r["after"]["asr"], "ra": r["after"]["ra"],
            "triggers": _triggers(r["after"]),
            "acc_before": r["before"]["acc"], "asr_before": r["before"]["asr"],
            "ra_before": r["before"]["ra"], "der": r["der"], "wall_s": r["wall_s"],
            "timings": json.dumps(r["timings"]), "peak_memory_mb": r.get("peak_memory_mb"),
            "settings": json.dumps({**c.settings, "params": r["params"]}),
            "adopted_from": r.get("adopted_from"), "diverged": _diverged(r)}


def _diverged(result: dict) -> int | None:
    """The epoch where a fine-tuning defense's loss peaked, when its fine-tune diverged
    (:func:`~mapprune.defenses.base.loss_divergence`, read from the saved history, so results saved before the
    check existed are judged too); None otherwise."""
    from ..defenses import FineTuning, defense_class
    from ..defenses.base import loss_divergence

    if not issubclass(defense_class(result["defense"]), FineTuning):
        return None
    d = loss_divergence(result.get("history") or [])
    return d["peak_epoch"] if d else None


def summarise(rows: list[dict]) -> dict:
    """{(attack, defense): {"n", "acc"/"asr"/"ra": (mean, sd or None)}}."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["attack"], r["defense"]), []).append(r)
    out = {}
    for k, members in groups.items():
        s = {"n": len(members), "diverged": sum(bool(x.get("diverged")) for x in members)}
        for m in ("acc", "asr", "ra"):
            v = [x[m] for x in members]
            s[m] = (statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else None)
        out[k] = s
    return out


def markdown(rows: list[dict], title: str, reference: dict | None = None) -> str:
    """Attacks as rows, defenses as columns: ASR / RA (mean ± sd over seeds), then ACC, each with the mean over
    attacks as the last row; each trigger of a several-trigger model; with a ``reference`` (load_reference), the
    same tables of its published numbers."""
    summary = summarise(rows)
    attacks = list(dict.fromkeys(r["attack"] for r in rows))
    defenses = list(dict.fromkeys(r["defense"] for r in rows))
    parts = [f"# {title}", "", *_tables(summary, attacks, defenses, "(mean ± sd over defense seeds)"),
             *_trigger_table(rows, defenses)]
    if any(s["diverged"] for s in summary.values()):
        from ..defenses.base import DIVERGENCE_FACTOR

        parts += [f"† the defense's fine-tune diverged (an epoch's loss over {DIVERGENCE_FACTOR:g}x the first's; "
                  "results.csv: `diverged`, the epoch of the peak) in at least one seed: it relearnt much of the model "
                  "from the clean subset, so what it removed may not be the defense's doing; a lower lr (`opts = {lr = "
                  "0.001}`) tells.", ""]
    if reference:
        published = {(a, d): {"n": 1, **{m: (v[i] / 100, None) for i, m in enumerate(("acc", "asr", "ra"))}}
                     for a, row in reference["cells"].items() for d, v in row.items()}
        cols = [d for d in defenses if any((a, d) in published for a in attacks)]
        if cols:
            parts += [f"# Published: {reference['name']}", "",
                      "The same cells as published (`-`: not published); averages over the published cells.", "",
                      *_tables(published, attacks, cols, "(published)")]
    return "\n".join(parts)


def _trigger_table(rows: list[dict], defenses: list[str]) -> list[str]:
    """For models with several triggers, each trigger's ASR / RA under each defense (mean over seeds): a defense
    judged only on the pooled ASR could remove one trigger and leave another."""
    per: dict = {}
    for r in rows:
        for label, m in (json.loads(r["triggers"]) if r.get("triggers") else {}).items():
            per.setdefault((r["attack"], label), {}).setdefault(r["defense"], []).append(m)
    if not per:
        return []
    parts = ["## ASR % / RA % per trigger (models with several triggers; mean over defense seeds)", "",
             "| attack: trigger | " + " | ".join(defenses) + " |", "|" + "---|" * (len(defenses) + 1)]
    for (attack, label), cells in per.items():
        parts.append(f"| {attack}: {label} | " + " | ".join(
            f"{100 * statistics.fmean(m['asr'] for m in cells[d]):.2f} / "
            f"{100 * statistics.fmean(m['ra'] for m in cells[d]):.2f}" if d in cells else "-"
            for d in defenses) + " |")
    return parts + [""]


def _tables(summary: dict, attacks: list[str], defenses: list[str], caption: str) -> list[str]:
    def pm(v):
        return f"{100 * v[0]:.2f}" + ("" if v[1] is None else f" ± {100 * v[1]:.2f}")

    parts = []
    def mark(s):
        return " †" if s.get("diverged") else ""

    for what, cell in (("ASR % / RA %", lambda s: f"{pm(s['asr'])} / {100 * s['ra'][0]:.2f}{mark(s)}"),
                       ("clean ACC %", lambda s: pm(s["acc"]) + mark(s))):
        parts += [f"## {what} {caption}", "",
                  "| attack | " + " | ".join(defenses) + " |", "|" + "---|" * (len(defenses) + 1)]
        for a in attacks:
            parts.append(f"| {a} | " + " | ".join(cell(summary[(a, d)]) if (a, d) in summary else "-"
                                                  for d in defenses) + " |")
        avg = []
        for d in defenses:
            ss = [summary[(a, d)] for a in attacks if (a, d) in summary]
            if not ss:
                avg.append("-")
                continue
            # A column with missing cells averages over fewer attacks: say over how many.
            part = "" if len(ss) == len(attacks) else f" ({len(ss)} of {len(attacks)})"
            if what.startswith("ASR"):
                avg.append(f"{100 * statistics.fmean(s['asr'][0] for s in ss):.2f} / "
                           f"{100 * statistics.fmean(s['ra'][0] for s in ss):.2f}{part}")
            else:
                avg.append(f"{100 * statistics.fmean(s['acc'][0] for s in ss):.2f}{part}")
        parts += ["| **average** | " + " | ".join(avg) + " |", ""]
    return parts


def write_results(cells: list[Cell], grid: dict, out: Path) -> None:
    """results.csv, table.md and figures/ of the finished cells, each file written atomically (a crash or a full
    disk leaves the previous complete file)."""
    rows = collect(cells)
    if not rows:
        return
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(out / "results.csv", buf.getvalue())
    text = markdown(rows, f"{grid['name']}: {grid['dataset']}", grid.get("_reference"))
    if grid.get("_sweeps"):
        text += "\n" + sweep_markdown(rows, grid["_sweeps"])
    atomic_write_text(out / "table.md", text)
    _figures(rows, out / "figures")
    for sw in grid.get("_sweeps", []):
        _sweep_figure(rows, sw, out / "figures")


def _sweep_points(rows: list[dict], sweep: dict) -> tuple[list, list[str], dict]:
    """(values, attacks, {(value, attack): summary}) of one swept option, over the cells that are done."""
    summary = summarise(rows)
    attacks = list(dict.fromkeys(r["attack"] for r in rows))
    got = {(str(v), a): summary[(a, label)] for v, label in sweep["points"] for a in attacks
           if (a, label) in summary}
    return [v for v, _ in sweep["points"]], attacks, got


def sweep_markdown(rows: list[dict], sweeps: list[dict]) -> str:
    """Per swept option: its values as rows, each attack's ASR and ACC as columns (the entry's own value marked)."""
    parts = ["## Sensitivity (one option changed at a time; * = the entry's own setting)", ""]
    for sw in sweeps:
        values, attacks, got = _sweep_points(rows, sw)
        parts += [f"### {sw['defense']}: {sw['param']}", "",
                  f"| {sw['param']} | " + " | ".join(f"{a} ASR / ACC %" for a in attacks) + " |",
                  "|" + "---|" * (len(attacks) + 1)]
        for i, v in enumerate(values):
            cells = [f"{100 * got[(str(v), a)]['asr'][0]:.2f} / {100 * got[(str(v), a)]['acc'][0]:.2f}"
                     if (str(v), a) in got else "-" for a in attacks]
            parts.append(f"| {_value_text(v)}{'*' if sw['points'][i][1] == sw['defense'] else ''} | "
                         + " | ".join(cells) + " |")
        parts.append("")
    return "\n".join(parts)


def _value_text(v) -> str:
    """A swept value as printed; an option whose own setting is None (the defense decides, e.g. FMT's budget from
    its rank rule) reads "default"."""
    return "default" if v is None else str(v)


def _sweep_figure(rows: list[dict], sweep: dict, folder: Path) -> None:
    from ..report import _plt

    values, attacks, got = _sweep_points(rows, sweep)
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    xs = values if numeric else list(range(len(values)))
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for a in attacks:
        pts = [(x, got[(str(v), a)]) for x, v in zip(xs, values) if (str(v), a) in got]
        if not pts:
            continue
        for ax, metric in zip(axes, ("asr", "acc")):
            ax.plot([p[0] for p in pts], [100 * p[1][metric][0] for p in pts], marker="o", label=a)
    for ax, metric in zip(axes, ("ASR %", "clean ACC %")):
        ax.set_xlabel(sweep["param"])
        ax.set_ylabel(metric)
        if not numeric:
            ax.set_xticks(xs, [_value_text(v) for v in values])
        ax.axvline(xs[[p[1] for p in sweep["points"]].index(sweep["defense"])], color="grey", lw=0.8, ls=":")
    axes[0].set_ylim(-3, 103)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{sweep['defense']}: {sweep['param']} (dotted: its own setting)", fontsize=9)
    fig.tight_layout()
    _save_figure(fig, folder / f"sweep-{sweep['defense']}-{sweep['param']}.png")
    plt.close(fig)


def _save_figure(fig, path: Path) -> None:
    """Saves a figure as PNG atomically."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_text(path, buf.getvalue())


def _figures(rows: list[dict], folder: Path) -> None:
    from ..report import _plt

    plt = _plt()
    folder.mkdir(exist_ok=True)
    summary = summarise(rows)
    attacks = list(dict.fromkeys(r["attack"] for r in rows))
    defenses = list(dict.fromkeys(r["defense"] for r in rows))
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for d in defenses:
        pts = [r for r in rows if r["defense"] == d]
        ax.scatter([100 * r["acc"] for r in pts], [100 * r["asr"] for r in pts], label=d, s=18, alpha=0.8)
    ax.set_xlabel("clean ACC %")
    ax.set_ylabel("ASR %")
    ax.set_ylim(-3, 103)
    ax.legend(fontsize=7, loc="best")
    ax.set_title("each point: one attack x seed", fontsize=9)
    fig.tight_layout()
    _save_figure(fig, folder / "asr_vs_acc.png")
    plt.close(fig)
    grid = [[100 * summary[(a, d)]["asr"][0] if (a, d) in summary else float("nan") for d in defenses]
            for a in attacks]
    fig, ax = plt.subplots(figsize=(2.5 + 1.1 * len(defenses), 2.5 + 0.5 * len(attacks)))
    im = ax.imshow(grid, cmap="Reds", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(defenses)), defenses, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(attacks)), attacks, fontsize=8)
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            if v == v:
                ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=ax, label="mean ASR %")
    fig.tight_layout()
    _save_figure(fig, folder / "asr_heatmap.png")
    plt.close(fig)
