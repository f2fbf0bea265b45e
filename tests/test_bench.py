"""mapprune bench: the grid is validated before any work, runs into ordinary run folders, survives being killed
half-way without recomputing a finished cell, and gives the same table on every backend."""

import csv
import json
import shutil
import tomllib
from pathlib import Path

import pytest
from test_bench_keys import SWEEP  # the sweep grid whose cell keys that file pins

from mapprune.bench import load_grid, markdown, plan, run_bench, sweep_markdown
from mapprune.errors import MapPruneError

GRIDS = Path(__file__).resolve().parents[1] / "benchmarks" / "grids"


def _quiet(*a, **k):
    pass


def _table(out: Path) -> list[dict]:
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    return sorted(({k: r[k] for k in ("attack", "defense", "seed", "acc", "asr", "ra")} for r in rows),
                  key=lambda r: (r["attack"], r["defense"], r["seed"]))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The shipped CI grid, run once, killed after five cells and resumed."""
    out = tmp_path_factory.mktemp("bench") / "digits"
    grid = GRIDS / "digits-tiny.toml"
    finished = []

    def kill_after_five(msg):
        if "finished" in msg:
            finished.append(msg)
            if len(finished) == 5:
                raise KeyboardInterrupt  # as a ^C half-way through the grid

    with pytest.raises(KeyboardInterrupt):
        run_bench(grid, out, progress=False, log=kill_after_five)
    cells = plan(load_grid(grid), out)
    done_before = {c.key: Path(c.path).stat().st_mtime_ns for c in cells if c.done()}
    assert len(done_before) == 5
    result = run_bench(grid, out, progress=False, log=_quiet)
    return out, grid, cells, done_before, result


def test_tiny_grid_completes_after_a_kill_without_recomputing(tiny):
    out, grid, cells, done_before, result = tiny
    assert len(cells) == 2 + 2 * 3 * 2 and result["done"] == len(cells) and not result["failed"]
    assert not set(result["ran"]) & set(done_before), "a finished cell was run again"
    for c in cells:
        if c.key in done_before:
            assert Path(c.path).stat().st_mtime_ns == done_before[c.key]
    again = run_bench(grid, out, progress=False, log=_quiet)
    assert again["ran"] == [] and again["done"] == len(cells)


def test_results_table_and_figures(tiny):
    out, _, cells, _, _ = tiny
    rows = _table(out)
    assert len(rows) == len(cells)
    assert {r["defense"] for r in rows} >= {"none", "clp"}
    fmt = [r for r in rows if r["defense"].startswith("fmt") and r["attack"] == "badnets"]
    assert len(fmt) == 2 and all(float(r["asr"]) < 0.1 for r in fmt), fmt  # the backdoor is really removed
    table = (out / "table.md").read_text()
    assert "| badnets |" in table and "**average**" in table and "±" in table
    assert "per trigger" not in table  # no model of this grid has several triggers
    assert (out / "figures" / "asr_heatmap.png").is_file() and (out / "figures" / "asr_vs_acc.png").is_file()
    # ordinary run folders: eval and report read them
    from mapprune.cli import main

    model_dirs = sorted(p for p in (out / "runs").iterdir() if not p.name.startswith("."))  # not the lock files
    assert main(["report", *map(str, model_dirs), "--compare"]) == 0
    assert main(["eval", str(model_dirs[0]), "--json"]) == 0


def test_parallel_workers_give_the_same_table(tiny, tmp_path):
    out, grid, _, _, _ = tiny
    one_attack = tmp_path / "grid.toml"
    text = grid.read_text().replace('[[attack]]\nname = "blended"\n', "")
    one_attack.write_text(text)
    par = tmp_path / "par"
    result = run_bench(one_attack, par, jobs=2, threads=1, progress=False, log=_quiet)
    assert result["done"] == 1 + 3 * 2 and not result["failed"]
    want = [r for r in _table(out) if r["attack"] == "badnets"]
    assert _table(par) == want


def test_ray_backend_gives_the_same_table(tiny, tmp_path):
    """The Ray engine (a local cluster started by the bench) gives the local engine's cells for one attack."""
    pytest.importorskip("ray", reason="Ray is an optional extra (pip install 'mapprune[ray]'); CI installs it")
    out, grid, _, _, _ = tiny
    one_attack = tmp_path / "grid.toml"
    one_attack.write_text(grid.read_text().replace('[[attack]]\nname = "blended"\n', ""))
    ray_out = tmp_path / "ray"
    result = run_bench(one_attack, ray_out, jobs=2, threads=1, backend="ray", progress=False, log=_quiet)
    assert result["done"] == 1 + 3 * 2 and not result["failed"]
    assert _table(ray_out) == [r for r in _table(out) if r["attack"] == "badnets"]



def test_only_runs_the_named_attacks_with_the_whole_grids_keys(tmp_path, capsys):
    """--only badnets: one model and its defense cells, keyed and placed as in the whole grid; the folder stays
    the whole grid's (bench.json), so the rest of the grid runs into it later without --update."""
    grid = GRIDS / "digits-tiny.toml"
    out = tmp_path / "only"
    whole = [c for c in plan(load_grid(grid), out) if c.attack == "badnets"]
    r = run_bench(grid, out, only=["badnets"], progress=False, log=_quiet)
    assert r["cells"] == len(whole) == 1 + 3 * 2 and r["done"] == len(whole) and not r["failed"]
    assert sorted(r["ran"]) == sorted(c.key for c in whole) and all(c.done() for c in whole)
    assert {row["attack"] for row in _table(out)} == {"badnets"} and len(_table(out)) == len(whole)
    assert "| badnets |" in (out / "table.md").read_text()
    # the whole grid, computing nothing: the badnets cells count as done, the blended model is not adopted
    rest = run_bench(grid, out, adopt_only=True, progress=False, log=_quiet)
    assert rest["ran"] == [] and rest["done"] == len(whole) and rest["cells"] == 2 + 2 * 3 * 2
    from mapprune.cli import main

    capsys.readouterr()
    assert main(["bench", str(grid), "--out", str(tmp_path / "none"), "--only", "badnets", "badnet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "'badnet'" in err and "valid labels: badnets, blended" in err, err
    assert not (tmp_path / "none").exists()


def test_the_jobs_module_names_the_bench_package():
    import mapprune.bench
    import mapprune.jobs.bench

    for name in mapprune.bench.__all__:
        assert getattr(mapprune.jobs.bench, name) is getattr(mapprune.bench, name), name

@pytest.mark.parametrize("edit, msg", [
    (('name = "badnets"', 'name = "badnet"'), "unknown attack 'badnet'"),
    (('name = "clp"', 'name = "clpp"'), "unknown defense 'clpp'"),
    (('name = "clp"', 'name = "clp"\nopts = {v = 3}'), "clp has no option 'v'"),
    (('name = "clp"', 'name = "clp"\nopts = {u = -1.0}'), "u must be"),
    (('name = "clp"', 'name = "clp"\nopts = {seed = 1}'), "seeds"),
    (('[[attack]]\nname = "badnets"', '[[attack]]\nname = "badnets"\nopts = {size = 3}'), "no option 'size'"),
    (('[[attack]]\nname = "badnets"', '[[attack]]\nname = "badnets"\nopts = {patch_size = "x"}'), "patch_size must be"),
    (("seeds = [0, 1]", "seeds = []"), "seeds"),
    (('preset = "demo"', 'preset = "fast"'), "unknown preset"),
    (('preset = "demo"', 'preset = "demo"\nepochs = 3'), "unknown key 'epochs'"),
])
def test_bad_grids_fail_before_any_work(tmp_path, edit, msg):
    text = (GRIDS / "digits-tiny.toml").read_text()
    assert edit[0] in text
    bad = tmp_path / "bad.toml"
    bad.write_text(text.replace(edit[0], edit[1], 1))
    with pytest.raises(MapPruneError, match=msg):
        run_bench(bad, tmp_path / "out", progress=False, log=_quiet)
    assert not (tmp_path / "out").exists(), "nothing is written before the grid is valid"


def test_a_folder_of_another_grid_is_refused(tiny, tmp_path):
    out, grid, _, _, _ = tiny
    other = tmp_path / "other.toml"
    other.write_text(grid.read_text().replace("seeds = [0, 1]", "seeds = [0]"))
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    with pytest.raises(MapPruneError, match="--update"):
        run_bench(other, copy, progress=False, log=_quiet)
    r = run_bench(other, copy, update=True, progress=False, log=_quiet)  # a sub-grid: everything already there
    assert r["ran"] == [] and r["done"] == 2 + 2 * 3
    assert json.loads((copy / "bench.json").read_text())["grid"]["seeds"] == [0]
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "notes.txt").write_text("mine")
    with pytest.raises(MapPruneError, match="not made by mapprune bench"):
        run_bench(grid, stray, progress=False, log=_quiet)


def test_a_failing_cell_is_recorded_and_retried(tmp_path, monkeypatch):
    import mapprune.bench.cells as cells

    grid = tmp_path / "g.toml"
    grid.write_text((GRIDS / "digits-tiny.toml").read_text().replace('[[attack]]\nname = "blended"\n', "")
                    .replace("seeds = [0, 1]", "seeds = [0]"))
    real = cells._run_defense

    def broken(c, g, progress, *rest):
        if c.defense == "clp":
            raise RuntimeError("disk on fire")
        return real(c, g, progress, *rest)
    monkeypatch.setattr(cells, "_run_defense", broken)
    out = tmp_path / "out"
    r = run_bench(grid, out, progress=False, log=_quiet)
    assert r["failed"] == ["badnets / clp / seed 0"] and r["done"] == 3
    record = json.loads(next((out / "failed").glob("*.json")).read_text())
    assert "disk on fire" in record["error"]
    assert run_bench(grid, out, progress=False, log=_quiet)["ran"] == []  # not retried unless asked
    monkeypatch.setattr(cells, "_run_defense", real)
    r = run_bench(grid, out, retry_failed=True, progress=False, log=_quiet)
    assert r["failed"] == [] and r["done"] == 4 and len(r["ran"]) == 1


def test_adopted_runs_bring_their_matching_defense_results(tiny, tmp_path):
    """adopt_defenses copies a finished result made with exactly a cell's settings (same numbers, marked
    adopted_from) and computes the cells whose settings differ."""
    out, grid, cells, _, _ = tiny
    source = next(c for c in cells if c.kind == "model" and c.attack == "badnets")
    seeded = {Path(c.path).name: c for c in cells if c.kind == "defense" and c.attack == "badnets"}
    text = grid.read_text().replace('[[attack]]\nname = "blended"\n', "").replace(
        '[[attack]]\nname = "badnets"\n', f'[[attack]]\nname = "badnets"\nrun = "{source.path}"\nadopt_defenses = true\n')
    text = text.replace('name = "clp"', 'name = "clp"\nopts = {u = 2.5}')  # not in the source: computed
    adopted = tmp_path / "adopt.toml"
    adopted.write_text(text)
    new = tmp_path / "new"
    r = run_bench(adopted, new, progress=False, log=_quiet)
    assert not r["failed"] and r["done"] == 1 + 3 * 2
    with open(new / "results.csv") as f:
        rows = [row for row in csv.DictReader(f) if row["defense"] != "none"]
    for row in rows:
        mine = json.loads((Path(row["path"]) / "result.json").read_text())
        if row["defense"].startswith("clp"):
            assert not row["adopted_from"] and "adopted_from" not in mine
            continue
        src = Path(row["adopted_from"])
        assert src.parent.parent == Path(source.path) and src.name in seeded
        theirs = json.loads((src / "result.json").read_text())
        assert mine["after"] == theirs["after"] and mine["params"] == theirs["params"]
    only = tmp_path / "only"
    text_only = text.replace('[[defense]]\nname = "ft"', '[[defense]]\nname = "ft"\nclean_ratio = 0.2')
    (tmp_path / "only.toml").write_text(text_only)
    r = run_bench(tmp_path / "only.toml", only, adopt_only=True, progress=False, log=_quiet)
    # adopt-only computes nothing: the model and the matching FMT results are adopted; FT at another clean ratio
    # and CLP with another u have no finished result and stay missing, not failed.
    assert r["failed"] == [] and r["ran"] and r["done"] == 1 + 2
    assert not (only / "failed").exists()
    with pytest.raises(MapPruneError, match="adopt_defenses"):
        bad = tmp_path / "bad.toml"
        bad.write_text(grid.read_text().replace('name = "blended"\n', 'name = "blended"\nadopt_defenses = true\n'))
        run_bench(bad, tmp_path / "bad", progress=False, log=_quiet)


def test_a_sweep_changes_one_setting_at_a_time_and_draws_its_curves(tmp_path):
    grid = tmp_path / "sweep.toml"
    grid.write_text(SWEEP)
    cells = plan(load_grid(grid), tmp_path / "plan")
    defenses = sorted(c.defense for c in cells if c.kind == "defense")
    assert len(defenses) == 4, defenses  # the entry itself, two other fractions, one other clean ratio
    ratios = {c.defense: c.settings["clean_ratio"] for c in cells if c.kind == "defense"}
    assert sorted(r for r in ratios.values() if r is not None) == [0.05] and sum(r is None for r in ratios.values()) == 3
    out = tmp_path / "out"
    r = run_bench(grid, out, progress=False, log=_quiet)
    assert not r["failed"]
    rows = [row for row in csv.DictReader(open(out / "results.csv")) if row["defense"] != "none"]
    fractions = sorted(json.loads(row["settings"])["params"]["fraction"] for row in rows)
    assert fractions == [0.0625, 0.125, 0.125, 0.25]
    pruned = {json.loads(row["settings"])["params"]["fraction"]: json.loads(
        (Path(row["path"]) / "result.json").read_text())["num_pruned"] for row in rows
        if json.loads(row["settings"])["clean_ratio"] is None}
    assert pruned[0.0625] < pruned[0.125] < pruned[0.25], pruned  # the swept option really reached the defense
    table = (out / "table.md").read_text()
    assert ": fraction\n" in table and "| 0.125* |" in table and ": clean_ratio\n" in table and "| 0.1* |" in table
    assert len(list((out / "figures").glob("sweep-fmt-*-fraction.png"))) == 1
    assert len(list((out / "figures").glob("sweep-fmt-*-clean_ratio.png"))) == 1
    bad = tmp_path / "bad.toml"
    bad.write_text(SWEEP.replace("sweep = {fraction", "sweep = {fractoin"))
    with pytest.raises(MapPruneError, match="no option 'fractoin' to sweep"):
        load_grid(bad)
    bad.write_text(SWEEP.replace("sweep = {fraction = [0.0625, 0.125, 0.25]", "sweep = {fraction = [0.125, 2.0]"))
    with pytest.raises(MapPruneError, match="sweep fraction = 2.0: .*fraction"):
        load_grid(bad)


def test_a_several_trigger_model_is_judged_on_each_trigger():
    """The pooled ASR of a two-trigger model can hide a trigger a defense left: table.md lists each one."""
    def row(attack, defense, asr, triggers=None):
        return {"attack": attack, "defense": defense, "acc": 0.9, "asr": asr, "ra": 0.5,
                "triggers": json.dumps(triggers) if triggers else ""}

    both = {"badnets->0": {"asr": 0.96, "ra": 0.03}, "blended->5": {"asr": 1.0, "ra": 0.0}}
    rows = [row("badnets", "none", 0.95), row("badnets", "ft", 0.9),
            row("multi", "none", 0.98, both),
            row("multi", "ft", 0.5, {"badnets->0": {"asr": 0.02, "ra": 0.8}, "blended->5": {"asr": 0.98, "ra": 0.01}}),
            row("multi", "ft", 0.5, {"badnets->0": {"asr": 0.04, "ra": 0.6}, "blended->5": {"asr": 0.96, "ra": 0.03}})]
    text = markdown(rows, "t")
    assert "| attack: trigger | none | ft |" in text
    assert "| multi: badnets->0 | 96.00 / 3.00 | 3.00 / 70.00 |" in text  # mean over the two seeds
    assert "| multi: blended->5 | 100.00 / 0.00 | 97.00 / 2.00 |" in text
    assert "| badnets: " not in text and "| multi | 98.00 / 50.00 | 50.00 ± 0.00 / 50.00 |" in text


def test_a_fine_tune_that_diverged_is_marked_in_the_table():
    """A fine-tune whose loss blew up relearns the model (the ViT's FT on Blended): table.md marks the cell, and
    results.csv's ``diverged`` is judged from the saved history, so results saved before the check count too."""
    from mapprune.bench.results import diverged_epoch

    climbing = [{"loss": v} for v in (0.63, 2.35, 7.14, 4.59)]
    assert diverged_epoch({"defense": "ft", "history": climbing}) == 3
    assert diverged_epoch({"defense": "fmt", "history": climbing[:1] + climbing[-1:]}) == 2
    assert diverged_epoch({"defense": "ft", "history": [{"loss": v} for v in (0.7, 0.8, 0.6)]}) is None
    assert diverged_epoch({"defense": "anp", "history": climbing}) is None  # not a fine-tune: its loss means else

    def row(defense, asr, diverged=None):
        return {"attack": "blended", "defense": defense, "acc": 0.9, "asr": asr, "ra": 0.5, "diverged": diverged}

    calm = markdown([row("none", 1.0), row("ft", 0.99)], "t")
    assert "†" not in calm
    text = markdown([row("none", 1.0), row("ft", 0.1, 3), row("ft", 0.2), row("fmt", 0.05)], "t")
    assert "| blended | 100.00 / 50.00 | 15.00 ± 7.07 / 50.00 † | 5.00 / 50.00 |" in text
    assert "| blended | 90.00 | 90.00 ± 0.00 † | 90.00 |" in text
    assert "† the defense's fine-tune diverged" in text


def test_a_sweep_over_an_option_the_defense_decides_prints_its_default_by_name(tmp_path):
    """FMT's budget is None by default (its rank rule decides): that point reads "default", first, not "None"."""
    grid = tmp_path / "budget.toml"
    grid.write_text(SWEEP.replace("sweep = {fraction = [0.0625, 0.125, 0.25], clean_ratio = [0.05]}",
                                  "sweep = {budget = [0, 12]}"))
    g = load_grid(grid)
    (sw,) = g.sweeps
    assert [v for v, _ in sw.points] == [None, 0, 12]
    rows = [{"attack": "badnets", "defense": label, "acc": 0.9, "asr": asr, "ra": 0.5}
            for (_, label), asr in zip(sw.points, (0.01, 0.2, 0.05))]
    text = sweep_markdown(rows, g.sweeps)
    assert "| default* | 1.00 / 90.00 |" in text and "| 0 | 20.00 / 90.00 |" in text and "None" not in text


def test_a_changed_default_makes_a_new_cell(tmp_path, monkeypatch):
    """A cell's key covers every hyperparameter the defense will run with, not only the grid's options: when the
    code's recommended recipe changes, FMT's cells are new (never an old recipe's result passed off as current),
    and the cells of other defenses keep their folders."""
    from mapprune.defenses import fmt

    grid = load_grid(GRIDS / "digits-tiny.toml")
    before = {c.label: c.path for c in plan(grid, tmp_path) if c.kind == "defense"}
    monkeypatch.setitem(fmt.FMT_RECIPES["recommended"], "unlearn", 0.3)
    after = {c.label: c.path for c in plan(grid, tmp_path) if c.kind == "defense"}
    changed = {label for label in before if before[label] != after[label]}
    assert changed == {label for label in before if label.split(" / ")[1].startswith("fmt")}, changed


REFERENCE = '''name = "Someone's paper"
[cells]
badnets = {none = [90.0, 95.5, 4.0], clp = [89.0, 1.25, 88.0]}
sig = {clp = [80.0, 2.0, 70.0]}
'''


def test_published_numbers_are_printed_beside_the_grid_without_changing_it(tiny, tmp_path):
    out, grid, cells, _, _ = tiny
    (tmp_path / "ref.toml").write_text(REFERENCE)
    with_ref = tmp_path / "grid.toml"
    with_ref.write_text(grid.read_text().replace('seeds = [0, 1]', 'seeds = [0, 1]\nreference = "ref.toml"'))
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    r = run_bench(with_ref, copy, progress=False, log=_quiet)  # not another grid: no --update needed
    assert r["ran"] == [] and r["done"] == len(cells)
    ours, published = (copy / "table.md").read_text().split("# Published: Someone's paper")
    assert "95.50" not in ours
    asr, acc = published.split("## clean ACC %")
    # only the grid's columns with a published number (none, clp), in the grid's order
    assert "| attack | none | clp |" in asr
    assert "| badnets | 95.50 / 4.00 | 1.25 / 88.00 |" in asr
    assert "| blended | - | - |" in asr  # a row the reference lacks; sig, which the grid lacks, is not shown
    assert "sig" not in published
    assert "| **average** | 95.50 / 4.00 (1 of 2) | 1.25 / 88.00 (1 of 2) |" in asr
    assert "| badnets | 90.00 | 89.00 |" in acc


@pytest.mark.parametrize("ref, msg", [
    (None, "reference file .* not found"),
    ('[cells]\nbadnets = {none = [1, 2, 3]}\n', "needs a 'name'"),
    ('name = "x"\n', r"needs a \[cells\] table"),
    ('name = "x"\n[cells]\nbadnets = {none = [1, 2]}\n', r"cells.badnets.none must be \[ACC, ASR, RA\]"),
    ('name = "x"\n[cells]\nbadnets = {none = [1, 2, 300]}\n', "three percentages"),
    ('name = "x"\nyear = 2022\n[cells]\nbadnets = {none = [1, 2, 3]}\n', "unknown key 'year'"),
])
def test_a_bad_reference_fails_before_any_work(tmp_path, ref, msg):
    if ref is not None:
        (tmp_path / "ref.toml").write_text(ref)
    grid = tmp_path / "grid.toml"
    grid.write_text((GRIDS / "digits-tiny.toml").read_text().replace('seeds = [0, 1]',
                                                                    'seeds = [0, 1]\nreference = "ref.toml"'))
    with pytest.raises(MapPruneError, match=msg):
        run_bench(grid, tmp_path / "out", progress=False, log=_quiet)
    assert not (tmp_path / "out").exists()


def test_every_shipped_grid_and_reference_is_valid(shared_data, user_cache, monkeypatch):
    """The grids docs/results.md and the README point at load as shipped (names, options, references)."""
    from mapprune.bench import load_reference

    monkeypatch.setenv("MAPPRUNE_DATA", str(shared_data))
    monkeypatch.chdir(GRIDS.parents[1])  # grids name run folders from the project root, as their comments say
    for path in sorted(GRIDS.glob("*.toml")):
        try:
            grid = load_grid(path)
        except MapPruneError as e:
            # grids adopting the run folders a user made under runs/ (not shipped) or the shared zoo: only those
            # may be absent
            assert "not a finished run folder" in str(e) and ("runs/cifar10-" in str(e) or "zoo/" in str(e)), e
            continue
        # a population grid trains models only (the scan's calibration reads them); every other grid defends them
        assert grid.attacks and (grid.defenses or grid.cleanse or grid.guard or "population" in path.name), path
    ref = load_reference(GRIDS.parent / "reference" / "backdoorbench-cifar10.toml")
    # baselines.md 1.1: eight attacks; BadNets has no CLP and no i-BAU cell in the leaderboard's CSV
    assert len(ref["cells"]) == 8 and ref["cells"]["badnets"]["nc"] == [89.05, 1.27, 89.16]
    assert "clp" not in ref["cells"]["badnets"] and ref["cells"]["sig"]["anp"] == [77.97, 0.01, 48.80]
    for name in ("cifar10-cpu-runs.toml", "cifar10-cpu.toml"):
        named = tomllib.loads((GRIDS / name).read_text())["reference"]
        assert load_reference(GRIDS / named) == ref


def test_report_and_bench_give_the_same_numbers_for_the_same_folders(tiny):
    """One results pipeline: `mapprune report --seeds` over the bench's run folders groups the same seeds and gets
    the same means, spreads and training times as the bench's results.csv."""
    from mapprune.bench.tables import summarise
    from mapprune.results import collect_rows, seed_summary

    out, _, cells, _, _ = tiny
    bench_rows = [{**r, "seed": int(r["seed"]) if r["seed"] else None, **{m: float(r[m]) for m in ("acc", "asr", "ra")}}
                  for r in csv.DictReader(open(out / "results.csv"))]
    bench = summarise(bench_rows)
    runs = sorted(p for p in (out / "runs").iterdir() if not p.name.startswith("."))
    report_rows = collect_rows(runs)
    groups = seed_summary(report_rows)
    assert len(groups) == len(bench) == 2 + 2 * 3
    attack_of = {Path(c.path).name: c.attack for c in cells if c.kind == "model"}
    label_of = {(Path(c.path).parent.parent.name, Path(c.path).name.removesuffix(f"-seed{c.seed}")): c.defense
                for c in cells if c.kind == "defense"}
    for g in groups:
        b = bench[(attack_of[g["run"]], label_of.get((g["run"], g["defense"]), "none"))]
        assert sorted(g["seeds"], key=str) == sorted(b["seeds"], key=str), (g, b)
        for m in ("acc", "asr", "ra"):
            assert g[m] == pytest.approx(b[m]), (g["run"], g["defense"], m)
    walls = {r["path"]: float(r["wall_s"]) for r in bench_rows if r["defense"] == "none"}
    assert {str(out / "runs" / r["run"]): r["wall_s"] for r in report_rows if r["defense"] == "none"} == \
        pytest.approx(walls)


RELAPSE_GRID = """
name = "digits-relapse"
dataset = "digits"
preset = "demo"
seeds = [0]

[[attack]]
name = "badnets"

[[attack]]
label = "clean"
name = "badnets"
poison_ratio = 0.0

[[defense]]
label = "ft"
name = "ft"
opts = {batch_size = 32, epochs = 2}

[relapse]
control = "clean"
images = 200
epochs = 1
reactivation_steps = 10
reactivation_images = 100
"""


def test_relapse_adds_its_columns_to_every_model_and_defended_model(tmp_path):
    """[relapse]: `mapprune relapse` on the backdoored model and on each of its defenses, beside the clean
    control, its ASRs in results.csv and table.md; the defense cells are not redone when only the relapse settings
    change, the relapse cells are."""
    grid = tmp_path / "grid.toml"
    grid.write_text(RELAPSE_GRID)
    out = tmp_path / "out"
    cells = plan(load_grid(grid), out)
    relapse_cells = [c for c in cells if c.kind == "relapse"]
    assert [(c.attack, c.defense) for c in relapse_cells] == [("badnets", "none"), ("badnets", "ft")]
    r = run_bench(grid, out, progress=False, log=_quiet)
    assert not r["failed"] and r["done"] == len(cells) == 2 + 2 + 2
    with open(out / "results.csv") as f:
        rows = {(row["attack"], row["defense"]): row for row in csv.DictReader(f)}
    for key in (("badnets", "none"), ("badnets", "ft")):
        report = json.loads((Path(rows[key]["path"]) / "relapse.json").read_text())
        assert float(rows[key]["relapse_asr"]) == report["models"]["repaired" if key[1] != "none" else "undefended"][
            "asr_after_mean"]
        assert float(rows[key]["control_relapse_asr"]) < 0.1 and rows[key]["reactivated_asr"] != ""
    assert rows[("clean", "ft")]["relapse_asr"] == ""  # the control's own cells are not retuned
    # the undefended backdoor survives one epoch of retuning; the clean control does not learn it from 5 images
    assert float(rows[("badnets", "none")]["relapse_asr"]) > 0.5
    table = (out / "table.md").read_text()
    assert "## ASR % after retuning / after reactivation" in table and "| badnets |" in table.split("retuning")[1]
    # other relapse settings: only the relapse cells run again
    grid.write_text(RELAPSE_GRID.replace("epochs = 1\n", "epochs = 2\n"))
    again = run_bench(grid, out, progress=False, log=_quiet, update=True)
    assert sorted(again["ran"]) == sorted(c.key for c in plan(load_grid(grid), out) if c.kind == "relapse")


@pytest.mark.parametrize("edit, msg", [
    ('control = "clean"', "control names the grid's clean model"),
    ('label = "clean"\nname = "badnets"\npoison_ratio = 0.0', "is a backdoored model; give it poison_ratio = 0"),
    ("images = 200", "is a whole number"),
    ("epochs = 1\n", "--epochs and --batch-size are at least 1"),
    ("reactivation_steps = 10", "unknown key 'reactivation_step'"),
])
def test_a_bad_relapse_table_fails_before_any_work(tmp_path, edit, msg):
    replacement = {'control = "clean"': 'control = "nope"',
                   'label = "clean"\nname = "badnets"\npoison_ratio = 0.0': 'label = "clean"\nname = "badnets"\npoison_ratio = 0.05',
                   "images = 200": "images = 200.5", "epochs = 1\n": "epochs = 0\n",
                   "reactivation_steps = 10": "reactivation_step = 10"}[edit]
    bad = tmp_path / "bad.toml"
    bad.write_text(RELAPSE_GRID.replace(edit, replacement, 1))
    with pytest.raises(MapPruneError, match=msg):
        run_bench(bad, tmp_path / "out", progress=False, log=_quiet)
    assert not (tmp_path / "out").exists()


DETECT_GRID = """
name = "digits-detect"
dataset = "digits"
preset = "demo"

[[attack]]
name = "badnets"

[cleanse]
detectors = ["fmt", "ss"]

[guard]
detectors = ["fmt", "ibd-psc"]
test_images = 200
"""


def test_cleanse_and_guard_cells_write_the_detection_tables(tmp_path):
    """[cleanse] and [guard]: each model's training set cleansed and its inputs guarded, every detector's AUROC,
    TPR and FPR in detection.csv and in table.md, read from the files the commands wrote."""
    grid = tmp_path / "grid.toml"
    grid.write_text(DETECT_GRID)
    out = tmp_path / "out"
    r = run_bench(grid, out, progress=False, log=_quiet)
    assert not r["failed"] and r["done"] == 3
    with open(out / "detection.csv") as f:
        rows = {(row["kind"], row["detector"]): row for row in csv.DictReader(f)}
    assert set(rows) == {("cleanse", "fmt"), ("cleanse", "ss"), ("guard", "fmt"), ("guard", "ibd-psc")}
    run = Path(rows[("cleanse", "fmt")]["path"])
    written = json.loads((run / "cleanse" / "fmt" / "result.json").read_text())
    assert float(rows[("cleanse", "fmt")]["auroc"]) == written["evaluation"]["auroc"] > 0.9
    guarded = json.loads((run / "guard" / "model" / "fmt.json").read_text())
    assert float(rows[("guard", "fmt")]["auroc"]) == guarded["all"]["auroc"] > 0.9
    table = (out / "table.md").read_text()
    assert "## Poisoned training images found (cleanse)" in table and "## Triggered inputs flagged (guard)" in table
    assert "| **mean AUROC** |" in table
    # done cells are not measured again
    assert run_bench(grid, out, progress=False, log=_quiet)["ran"] == []


@pytest.mark.parametrize("edit, msg", [
    ('detectors = ["fmt", "ss"]', "unknown sample detector|unknown"),
    ("test_images = 200", "test_images is a whole number of at least 1"),
])
def test_a_bad_detection_table_fails_before_any_work(tmp_path, edit, msg):
    replacement = {'detectors = ["fmt", "ss"]': 'detectors = ["fmt", "nope"]', "test_images = 200": "test_images = 0"}
    bad = tmp_path / "bad.toml"
    bad.write_text(DETECT_GRID.replace(edit, replacement[edit], 1))
    with pytest.raises(MapPruneError, match=msg):
        run_bench(bad, tmp_path / "out", progress=False, log=_quiet)
    assert not (tmp_path / "out").exists()
