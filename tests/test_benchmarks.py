"""The scripts in benchmarks/ run: each through its ``main(argv)`` on the embedded digits (or an untrained model),
with small arguments, and what it prints agrees with what it read; each refuses bad arguments with argparse's exit
status 2; each has a ``--help``, names the command that runs it in its docstring and is listed in
benchmarks/README.md."""

import csv
import importlib.util
import json
import os
import re
import statistics
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
SCRIPTS = sorted(str(p.relative_to(BENCHMARKS)) for p in BENCHMARKS.rglob("*.py") if "__pycache__" not in p.parts)
REFERENCE = BENCHMARKS / "reference" / "backdoorbench-cifar10.toml"

# Two backdoored models and a clean one on the digits, two cheap defenses at two seeds: rows for bench_average, run
# folders for the scripts that read runs.
GRID = """
name = "digits-benchmarks"
dataset = "digits"
preset = "demo"
seeds = [0, 1]

[[attack]]
name = "badnets"

[[attack]]
name = "blended"

[[attack]]
label = "clean"
name = "badnets"
poison_ratio = 0.0

[[defense]]
name = "ft"
opts = {batch_size = 32, epochs = 1}

[[defense]]
name = "clp"
"""


def load(rel: str):
    """The script benchmarks/``rel`` as a module (benchmarks/ is not a package); importing it runs nothing."""
    path = BENCHMARKS / rel
    spec = importlib.util.spec_from_file_location(f"benchmark_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(rel: str, argv: list[str], capsys):
    """(main's return value, what it printed)."""
    capsys.readouterr()
    value = load(rel).main([str(a) for a in argv])
    return value, capsys.readouterr().out


def refused(rel: str, argv: list[str], capsys) -> str:
    """argparse's refusal (exit status 2) of ``argv``: its message."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        load(rel).main([str(a) for a in argv])
    assert e.value.code == 2, f"{rel} {argv} exited {e.value.code}, not argparse's 2"
    return capsys.readouterr().err


def table(out: str, first_column: str | None = None) -> list[dict]:
    """The rows of the markdown table in ``out`` (the one whose header starts with ``first_column``, else the first)
    as {header: cell}."""
    lines = out.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("|") and i + 1 < len(lines) and lines[i + 1].startswith("|---"):
            header = [c.strip() for c in line.strip("|").split("|")]
            if first_column and header[0] != first_column:
                continue
            rows = []
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                rows.append(dict(zip(header, (c.strip() for c in row.strip("|").split("|")))))
            return rows
    raise AssertionError(f"no markdown table in:\n{out}")


def numbers(text: str) -> list[float]:
    return [float(v) for v in re.findall(r"[-+]?\d+\.?\d*", text)]


@pytest.fixture(scope="module")
def digits_bench(tmp_path_factory) -> Path:
    """A bench folder of GRID, run in this process."""
    from mapprune.bench import run_bench

    tmp = tmp_path_factory.mktemp("benchmarks")
    (tmp / "grid.toml").write_text(GRID)
    done = run_bench(tmp / "grid.toml", tmp / "bench", jobs=1, threads=1, progress=False, log=lambda *a, **k: None)
    assert not done["failed"] and done["done"] == done["cells"] == 15
    return tmp / "bench"


@pytest.fixture(scope="module")
def runs(digits_bench) -> dict[str, Path]:
    """attack label -> the bench's run folder of that model."""
    with open(digits_bench / "results.csv", newline="") as f:
        return {r["attack"]: Path(r["path"]) for r in csv.DictReader(f) if r["defense"] == "none"}


@pytest.fixture(scope="module")
def scanned(runs) -> dict[str, dict]:
    """attack label -> the scan.json written into each run, as `mapprune scan RUN` writes it (NC, shortened, on the
    BadNets model only)."""
    from mapprune.jobs.scan import scan_and_save
    from mapprune.runs import load_run

    reports = {}
    for label, folder in runs.items():
        r = load_run(folder)
        nc = label == "badnets"
        reports[label] = scan_and_save(r.model, r.dataset, folder / "scan", name=str(folder), nc=nc, mmbd=False,
                                       nc_options={"reverse_epochs": 2} if nc else None)
    return reports


# ------------------------------------------------------------------------------------------------ every script


def test_the_scripts_are_the_listed_ones():
    """A new script gets a smoke test here and a line in benchmarks/README.md."""
    assert SCRIPTS == sorted(["adaptive_digits.py", "allocator.py", "bench_jobs.py", "fmt_recipe_cost.py",
                              "fmt_speed.py", "guard_overhead.py", "population_grid.py", "results_tables.py",
                              "sig_visibility.py", "train_throughput.py",
                              "analysis/bench_average.py", "analysis/field_null.py", "analysis/scan_population.py",
                              "analysis/stimulation_table.py", "analysis/trigger_spread.py"])


@pytest.mark.parametrize("rel", SCRIPTS)
def test_each_script_has_help_its_command_and_a_readme_line(rel, capsys):
    module = load(rel)
    assert capsys.readouterr().out == "", f"importing {rel} printed something: it must do its work in main()"
    assert f"python benchmarks/{rel}" in module.__doc__, f"{rel}'s docstring does not give the command that runs it"
    assert f"benchmarks/{rel}" in (BENCHMARKS / "README.md").read_text(), f"benchmarks/README.md does not list {rel}"
    with pytest.raises(SystemExit) as e:
        module.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:") and " ".join(module.__doc__.split()[:3]) in " ".join(out.split())


# ------------------------------------------------------------------------------------------------ analysis scripts


def test_bench_average_is_the_mean_of_the_cells_it_read(digits_bench, tmp_path, capsys):
    results = digits_bench / "results.csv"
    with open(results, newline="") as f:
        rows = list(csv.DictReader(f))
    attacks = ["badnets", "blended", "clean"]
    means, out = run("analysis/bench_average.py", [results, "--attacks", ",".join(attacks)], capsys)
    printed = {r["defense"]: r for r in table(out)}
    assert set(printed) == {"none", "ft-batchsize32-epochs1", "clp"} == set(means)
    for d, row in printed.items():
        for m, col in (("acc", "ACC"), ("asr", "ASR"), ("ra", "RA")):
            # seeds averaged within a cell, then the cells over the attacks
            want = statistics.fmean(statistics.fmean(float(r[m]) for r in rows if r["attack"] == a and r["defense"] == d)
                                    for a in attacks)
            assert means[d][m] == pytest.approx(want)
            assert row[col] == f"{100 * want:.2f}"
        assert "published ACC / ASR / RA" not in row  # the reference was not given

    # Beside the reference: published means only where it has every attack (clp: blended but not badnets).
    from mapprune.jobs.bench import load_reference

    ref = load_reference(REFERENCE)["cells"]
    _, out = run("analysis/bench_average.py", [results, "--attacks", "badnets,blended", "--reference", REFERENCE], capsys)
    printed = {r["defense"]: r for r in table(out)}
    want = " / ".join(f"{statistics.fmean(ref[a]['none'][i] for a in ('badnets', 'blended')):.2f}" for i in range(3))
    assert printed["none"]["published ACC / ASR / RA"] == want
    assert printed["clp"]["published ACC / ASR / RA"] == "-"

    # A defense without a cell on one of the attacks gets no mean.
    partial = tmp_path / "results.csv"
    with open(partial, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(r for r in rows if not (r["attack"] == "blended" and r["defense"] == "clp"))
    means, out = run("analysis/bench_average.py", [partial, "--attacks", "badnets,blended"], capsys)
    assert {r["defense"]: r for r in table(out)}["clp"]["ACC"] == "missing blended" and "clp" not in means

    assert "no rows for wanet" in refused("analysis/bench_average.py", [results, "--attacks", "badnets,wanet"], capsys)
    assert "no results file" in refused("analysis/bench_average.py", [tmp_path / "none.csv", "--attacks", "badnets"],
                                        capsys)
    assert "--attacks" in refused("analysis/bench_average.py", [results], capsys)


# ------------------------------------------------------------------------------------------------ results tables

FT, FMT = "ft-batchsize32-epochs5", "fmt-fraction0.125-batchsize32-distill0-epochs5"  # digits-tiny's labels
# One table of each kind, with selections and shown names; the last names a bench the command is not given.
TABLES_DOC = f"""# Tables of the digits grid

<!-- table: digits-tiny asr-ra defenses=none,{FT}:FT,{FMT}:FMT,clp -->

<!-- end table -->

Prose between tables stays as written: 12.34.

<!-- table: digits-tiny acc attacks=blended:Blended,badnets
     defenses=clp,{FMT}:FMT -->
<!-- end table -->

<!-- table: digits-tiny acc-asr-ra defenses="none:no defense,{FT}:FT" -->
<!-- end table -->

<!-- table: digits-tiny means attacks=badnets,blended reference=backdoorbench-cifar10
     defenses="none,clp,{FT}:FT (5 epochs),{FMT}" -->
<!-- end table -->

<!-- table: digits-tiny seeds defenses={FMT}:FMT attacks=blended,badnets:BadNets -->
<!-- end table -->

<!-- table: cifar10-cpu asr-ra -->

| attack | ft |
|---|---|
| BadNets | 91.93 / 7.18 |

<!-- end table -->
"""


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory) -> Path:
    """The shipped digits grid (benchmarks/grids/digits-tiny.toml: 2 attacks x 3 defenses x 2 seeds), run once."""
    from mapprune.bench import run_bench

    out = tmp_path_factory.mktemp("tiny") / "bench"
    done = run_bench(BENCHMARKS / "grids" / "digits-tiny.toml", out, jobs=1, threads=1, progress=False,
                     log=lambda *a, **k: None)
    assert not done["failed"] and done["done"] == done["cells"] == 14
    return out


def generated(text: str) -> list[list[dict]]:
    """The rows of the table in each generated region of ``text``, in order (read with a regex, not the script)."""
    return [table(body) if body.strip() else []
            for body in re.findall(r"<!--\s*table:.*?-->(.*?)<!--\s*end table\s*-->", text, re.S)]


def test_results_tables_writes_each_kind_as_the_means_of_results_csv(tiny_bench, tmp_path, capsys):
    """Every number of the five kinds of table equals what results.csv gives, computed here with csv and statistics:
    seeds averaged within a cell (sample sd beside the mean), then the cell means over the attacks."""
    doc = tmp_path / "tables.md"
    doc.write_text(TABLES_DOC)
    result, out = run("results_tables.py", ["--doc", doc, "--bench", f"digits-tiny={tiny_bench}"], capsys)
    text = doc.read_text()
    unchecked = text.count("\n", 0, text.index("<!-- table: cifar10-cpu")) + 1  # its line in the file written
    assert result["not_checked"] == [f"line {unchecked} (cifar10-cpu asr-ra)"] and "not checked" in out
    assert len(result["checked"]) == 5 and "Prose between tables stays as written: 12.34." in text
    assert text.endswith(TABLES_DOC[TABLES_DOC.index("<!-- table: cifar10-cpu"):])  # the unchecked region as it was

    with open(tiny_bench / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))

    def values(a, d, m):
        return [float(r[m]) for r in rows if r["attack"] == a and r["defense"] == d]

    def pct(v):
        return f"{100 * v:.2f}"

    def pm(a, d, m):
        v = values(a, d, m)
        return pct(statistics.fmean(v)) + (f" ± {pct(statistics.stdev(v))}" if len(v) > 1 else "")

    def dagger(a, d):
        return " †" if any(r["diverged"] for r in rows if r["attack"] == a and r["defense"] == d) else ""

    def over_attacks(attacks, d, m):
        return pct(statistics.fmean(statistics.fmean(values(a, d, m)) for a in attacks))

    asr_ra, acc, cells, means, seeds = generated(text)[:5]
    shown = {"none": "none", FT: "FT", FMT: "FMT", "clp": "clp"}
    assert [r["attack"] for r in asr_ra] == ["badnets", "blended", "**average**"]
    assert list(asr_ra[0]) == ["attack", "none", "FT", "FMT", "clp"]
    for row in asr_ra[:2]:
        for d, name in shown.items():
            assert row[name] == f"{pm(row['attack'], d, 'asr')} / {pct(statistics.fmean(values(row['attack'], d, 'ra')))}" \
                + dagger(row["attack"], d)
    for d, name in shown.items():
        assert asr_ra[2][name] == " / ".join(over_attacks(["badnets", "blended"], d, m) for m in ("asr", "ra"))

    assert [r["attack"] for r in acc] == ["Blended", "badnets", "**average**"] and list(acc[0])[1:] == ["clp", "FMT"]
    for row, a in zip(acc, ("blended", "badnets")):
        assert row["clp"] == pm(a, "clp", "acc") + dagger(a, "clp") and row["FMT"] == pm(a, FMT, "acc") + dagger(a, FMT)
    assert acc[2]["clp"] == over_attacks(["blended", "badnets"], "clp", "acc")

    assert list(cells[0]) == ["attack", "no defense", "FT"] and len(cells) == 2  # no average row
    for row in cells:
        for d, name, n in (("none", "no defense", 1), (FT, "FT", 2)):
            three = " / ".join(pct(statistics.fmean(values(row["attack"], d, m))) for m in ("acc", "asr", "ra"))
            assert row[name] == three + (f" ({n} seeds)" if n > 1 else "") + dagger(row["attack"], d)

    from mapprune.bench.grid import load_reference

    ref = load_reference(REFERENCE)["cells"]
    assert [r["defense"] for r in means] == ["none", "clp", "FT (5 epochs)", FMT]
    for row, d in zip(means, ("none", "clp", FT, FMT)):
        for m, col in (("acc", "ACC"), ("asr", "ASR"), ("ra", "RA")):
            assert row[col] == over_attacks(["badnets", "blended"], d, m)
    # published means only where the reference has every attack: none on both, clp on blended only
    assert means[0]["published ACC / ASR / RA"] == " / ".join(
        f"{statistics.fmean(ref[a]['none'][i] for a in ('badnets', 'blended')):.2f}" for i in range(3))
    assert [r["published ACC / ASR / RA"] for r in means[1:]] == ["-", "-", "-"]

    assert list(seeds[0]) == ["attack", "seed 0", "seed 1", "mean ASR", "mean ΔACC"]
    assert [r["attack"] for r in seeds] == ["blended", "BadNets"]
    for row, a in zip(seeds, ("blended", "badnets")):
        mine = {int(r["seed"]): r for r in rows if r["attack"] == a and r["defense"] == FMT}
        for seed, r in mine.items():
            assert row[f"seed {seed}"] == " / ".join(pct(float(r[m])) for m in ("acc", "asr", "ra"))
        assert row["mean ASR"] == pct(statistics.fmean(values(a, FMT, "asr")))
        assert row["mean ΔACC"] == f"{100 * statistics.fmean(float(r['acc']) - float(r['acc_before']) for r in mine.values()):+.2f}"


def test_results_tables_check_passes_on_its_own_output_and_fails_after_a_number_is_edited(tiny_bench, tmp_path,
                                                                                          capsys):
    doc = tmp_path / "tables.md"
    doc.write_text(TABLES_DOC)
    argv = ["--doc", doc, "--bench", f"digits-tiny={tiny_bench}"]
    first, out = run("results_tables.py", argv, capsys)
    assert len(first["differs"]) == 5 and out.count(": rewritten from") == 5  # every region was empty
    written = doc.read_text()
    again, out = run("results_tables.py", argv, capsys)  # writing twice changes nothing
    assert again["differs"] == [] and doc.read_text() == written and out.count(": unchanged from") == 5
    checked, out = run("results_tables.py", [*argv, "--check"], capsys)
    assert checked["differs"] == [] and "5 of 5 tables match their bench folders, 1 not checked" in out

    # One number of the ACC table changed by hand: --check names that region, exits 1 and writes nothing.
    region = written.index("<!-- table: digits-tiny acc ")
    line = written.count("\n", 0, region) + 1
    number = re.compile(r"\| (\d+\.\d\d)").search(written, region)
    edited = written[:number.start(1)] + f"{float(number.group(1)) + 1:.2f}" + written[number.end(1):]
    doc.write_text(edited)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        load("results_tables.py").main([str(a) for a in [*argv, "--check"]])
    out = capsys.readouterr().out
    assert e.value.code == 1 and doc.read_text() == edited
    assert f"line {line} (digits-tiny acc) differs from {tiny_bench}" in out and "4 of 5 tables match" in out
    assert out.count("differs from") == 1
    run("results_tables.py", argv, capsys)  # rewriting puts the bench's number back
    assert doc.read_text() == written


@pytest.mark.parametrize("case, doc_text, bench, message", [
    ("missing folder", TABLES_DOC, "digits-tiny={missing}", "no such folder"),
    ("bench without results.csv", TABLES_DOC, "digits-tiny={empty}", "has no results.csv"),
    ("bench not as NAME=DIR", TABLES_DOC, "{good}", "give it as NAME=DIR"),
    ("bench the file has no table of", TABLES_DOC, "cifar10-seeds={good}", "has no table of a bench of that name"),
    ("unknown kind", "<!-- table: digits-tiny asr -->\n<!-- end table -->\n", "digits-tiny={good}",
     "unknown table kind 'asr'"),
    ("marker without end", "<!-- table: digits-tiny acc -->\n\n| a |\n", "digits-tiny={good}",
     "has no <!-- end table -->"),
    ("marker without its closing", "<!-- table: digits-tiny acc\n<!-- end table -->\n", "digits-tiny={good}",
     "without its closing -->"),
    ("end without marker", "<!-- end table -->\n", "digits-tiny={good}", "without a table marker before it"),
    ("unknown option", "<!-- table: digits-tiny acc attack=badnets -->\n<!-- end table -->\n", "digits-tiny={good}",
     "unknown option 'attack=badnets'"),
    ("unknown attack", "<!-- table: digits-tiny acc attacks=wanet -->\n<!-- end table -->\n", "digits-tiny={good}",
     "has no attack 'wanet'"),
    ("unknown reference", "<!-- table: digits-tiny means reference=nope -->\n<!-- end table -->\n",
     "digits-tiny={good}", "no reference 'nope'"),
    ("seeds of two defenses", "<!-- table: digits-tiny seeds defenses=ft,clp -->\n<!-- end table -->\n",
     "digits-tiny={good}", "a seeds table is of one defense"),
])
def test_results_tables_refuses_bad_inputs_in_one_line_with_exit_2(case, doc_text, bench, message, tmp_path, capsys):
    from mapprune.bench.results import COLUMNS

    good, empty = tmp_path / "good", tmp_path / "empty"
    good.mkdir()
    empty.mkdir()
    with open(good / "results.csv", "w", newline="") as f:  # a bench's results.csv of one model and one defense
        w = csv.DictWriter(f, fieldnames=list(COLUMNS))
        w.writeheader()
        w.writerow({"attack": "badnets", "defense": "none", "acc": 0.9, "asr": 0.95, "ra": 0.04})
        w.writerow({"attack": "badnets", "defense": "ft", "seed": 0, "acc": 0.9, "asr": 0.5, "ra": 0.4,
                    "acc_before": 0.9})
    doc = tmp_path / "page.md"
    doc.write_text(doc_text)
    bench = bench.format(missing=tmp_path / "missing", empty=empty, good=good)
    err = refused("results_tables.py", ["--doc", doc, "--bench", bench], capsys)
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and message in err, (case, err)
    assert doc.read_text() == doc_text, f"{case}: the file was changed"


def test_results_tables_names_a_missing_doc_in_one_line(tmp_path, capsys):
    err = refused("results_tables.py", ["--doc", tmp_path / "none.md"], capsys)
    assert err.strip() == f"results_tables.py: error: --doc {tmp_path / 'none.md'}: no such file"


def test_scan_population_reads_each_scan(digits_bench, runs, scanned, tmp_path, capsys):
    result, out = run("analysis/scan_population.py", [digits_bench], capsys)
    printed = table(out)
    assert len(printed) == 3
    by_name = {r["model"].removesuffix(" (clean)"): r for r in printed}
    for label, folder in runs.items():
        row, scan = by_name[folder.name], scanned[label]
        assert row["model"].endswith("(clean)") == (label == "clean")
        assert row["largest pull"] == f"{scan['score']:.2f}"
        assert row["stimulation anomaly"] == f"{scan['stimulation']['anomaly_index']:.2f}"
        assert row["scan verdict"].startswith(scan["verdict"])
        assert row["NC read from"] == ("scan" if label == "badnets" else "not run")
    nc = scanned["badnets"]["neural_cleanse"]
    assert by_name[runs["badnets"].name]["NC anomaly index (flagged)"].startswith(f"{nc['anomaly_index']:.2f} (")
    flagged = {label: scanned[label]["verdict"] == "backdoored" for label in runs}
    assert result["fp"] == flagged["clean"] and result["tp"] == flagged["badnets"] + flagged["blended"]
    assert f"clean models 1, flagged {result['fp']}" in out and f"backdoored 2, flagged {result['tp']}" in out
    assert all(0 <= v <= 1 for v in result["auroc"].values())
    # A run folder given directly is read too; one without a scan is left out, by name.
    unscanned = tmp_path / "unscanned"
    unscanned.mkdir()
    (unscanned / "manifest.json").write_text((runs["clean"] / "manifest.json").read_text())
    _, out = run("analysis/scan_population.py", [runs["badnets"], unscanned], capsys)
    assert len(table(out)) == 1 and "left out: unscanned: no scan/scan.json" in out
    assert "is neither a run folder, a bench folder with runs/" in refused("analysis/scan_population.py", [tmp_path], capsys)
    assert "no scanned model" in refused("analysis/scan_population.py", [unscanned], capsys)


def test_stimulation_table_is_what_the_scan_measured(runs, scanned, tmp_path, capsys):
    rows, out = run("analysis/stimulation_table.py", [runs["badnets"], runs["clean"], "--levels", "4"], capsys)
    printed = table(out)
    assert [r["real target"] for r in printed] == ["0", "none"]
    for row, label in zip(printed, ("badnets", "clean")):
        scan = scanned[label]["stimulation"]  # the scan runs the same test on the same subset
        assert row["anomaly index"] == f"{scan['anomaly_index']:.2f}"
        assert row["suspected (pull)"].startswith(f"{scan['target']} (")
    assert len(rows) == 2
    assert "levels must be > 0" in refused("analysis/stimulation_table.py", [runs["clean"], "--levels", "0"], capsys)
    assert "comma-separated numbers" in refused("analysis/stimulation_table.py", [runs["clean"], "--levels", "x"],
                                                capsys)
    assert "not a run folder" in refused("analysis/stimulation_table.py", [tmp_path], capsys)


def test_trigger_spread_counts_the_responding_maps(runs, tmp_path, capsys):
    from mapprune.jobs.diagnose import trigger_response
    from mapprune.runs import load_run

    rows, out = run("analysis/trigger_spread.py", [runs["badnets"], "--images", "100"], capsys)
    (row,) = table(out)
    r = load_run(runs["badnets"])
    xc = r.dataset.x_test[r.dataset.y_test != r.attack.target][:100]
    z = torch.cat(list(trigger_response(r.model, xc, r.attack.apply(xc)).values()))
    assert row["trigger"] == f"badnets -> {r.attack.target}"
    assert row["largest response (z)"] == f"{z.max():.2f}"
    assert int(row["maps z > 2"]) == int((z > 2).sum()) >= int(row["maps z > 3"]) == int((z > 3).sum())
    assert len(rows) == 1
    assert "--images must be >= 2" in refused("analysis/trigger_spread.py", [runs["badnets"], "--images", "0"], capsys)
    assert "not a run folder" in refused("analysis/trigger_spread.py", [tmp_path], capsys)


def test_field_null_names_a_class_per_probe_and_null(runs, tmp_path, capsys):
    _, out = run("analysis/field_null.py", [runs["badnets"]], capsys)
    printed = table(out)
    assert [r["probe"] for r in printed] == ["warp", "smooth"]
    for row in printed:
        assert row["target"] == "0"
        for col in ("sign: suspected (anomaly)", "field: suspected (anomaly)"):
            suspected, anomaly = re.fullmatch(r"(\d+) \((-?[\d.]+|nan|inf)\)", row[col]).groups()
            assert 0 <= int(suspected) < 10
        assert len(numbers(row["pull to target: sign / field"])) == 2
    assert "not a run folder" in refused("analysis/field_null.py", [tmp_path], capsys)


# ------------------------------------------------------------------------------------------------ digits tools


def test_sig_visibility_measures_the_stripes_and_each_class_search(runs, tmp_path, capsys):
    from mapprune.attacks.reactivation import perturbed
    from mapprune.attacks.sig import sinusoid
    from mapprune.jobs.attack import attack_run
    from mapprune.metrics import predict
    from mapprune.runs import load_run

    sig = tmp_path / "sig"
    attack_run("sig", sig, dataset="digits", preset="demo", progress=False, poison_ratio=0.05)
    found, out = run("sig_visibility.py", [sig, runs["clean"], "--deltas", "0,80", "--eps", "0.1", "--steps", "2"],
                     capsys)
    assert list(found) == ["sig", runs["clean"].name]
    r = load_run(sig)
    target, f = r.attack.target, r.manifest["attack"]["frequency"]
    test = r.dataset.x_test[r.dataset.y_test != target]
    for delta in (0, 80):  # the stripes' reach is the target rate of the striped non-target test images
        expected = float((predict(r.model, perturbed(test, sinusoid(test.shape[-1], delta, f))) == target).float().mean())
        assert found["sig"]["stripes"][delta] == pytest.approx(expected)
    for measured in found.values():
        assert set(measured["searched"]) == {("free", 0.1), ("stripes", 0.1)}
        assert all(len(v) == r.dataset.num_classes and all(0 <= c <= 1 for c in v)
                   for v in measured["searched"].values())
    assert f"class {target}" in out
    assert "not a SIG model" in refused("sig_visibility.py", [runs["clean"], sig], capsys)
    assert "--steps must be >= 1" in refused("sig_visibility.py", [sig, "--steps", "0"], capsys)


def test_adaptive_digits_repairs_the_model_it_trained(tmp_path, capsys):
    from mapprune.runs import read_manifest

    _, out = run("adaptive_digits.py", ["--models", "badnets", "--out", tmp_path], capsys)
    (row,) = table(out)
    m = read_manifest(tmp_path / "badnets")["metrics"]
    assert m["asr"] > 0.9
    assert row["undefended"] == f"{100 * m['acc']:.2f} / {100 * m['asr']:.2f} / {100 * m['ra']:.2f}"
    fmt_acc, fmt_asr, _ = numbers(row["FMT"])
    assert fmt_asr < 100 * m["asr"] / 2 and fmt_acc > 80
    assert re.fullmatch(r"[\d.]+, class \d \([\d.]+\)", row["FMT pull, suspected (anomaly)"])
    assert "unknown model 'nope'" in refused("adaptive_digits.py", ["--models", "badnets,nope"], capsys)


def test_population_grid_writes_the_same_grid_for_the_same_arguments(tmp_path, capsys):
    import tomllib

    args = ["--backdoored", "8", "--clean", "2", "--seed", "1"]
    _, printed = run("population_grid.py", ["--out", tmp_path / "a.toml", *args], capsys)
    assert "8 backdoored and 2 clean" in printed
    run("population_grid.py", ["--out", tmp_path / "b.toml", *args], capsys)
    text = (tmp_path / "a.toml").read_text()
    assert text == (tmp_path / "b.toml").read_text()
    grid = tomllib.loads(text)
    attacks = grid["attack"]
    assert grid["dataset"] == "cifar10" and len(attacks) == 10
    clean = [a for a in attacks if a["poison_ratio"] == 0]
    assert [a["label"] for a in clean] == ["clean-00", "clean-01"]
    assert all(0.0 < a["poison_ratio"] <= 0.1 for a in attacks if a not in clean)
    assert "not both zero" in refused("population_grid.py", ["--out", tmp_path / "c.toml", "--backdoored", "0",
                                                             "--clean", "0"], capsys)


def test_population_grid_is_a_grid_the_bench_loads(shared_data, user_cache, monkeypatch, tmp_path, capsys):
    """The bench checks every attack of the grid against CIFAR-10's image shape: skipped without the dataset."""
    from mapprune.bench import load_grid

    monkeypatch.setenv("MAPPRUNE_DATA", str(shared_data))
    run("population_grid.py", ["--out", tmp_path / "population.toml", "--backdoored", "16", "--clean", "4"], capsys)
    labels = load_grid(tmp_path / "population.toml").attack_labels()
    assert len(labels) == 20 and sum(label.startswith("clean-") for label in labels) == 4


# ------------------------------------------------------------------------------------------------ speed and cost


def test_fmt_recipe_cost_times_each_recipe(runs, capsys):
    from mapprune.probes import map_layers
    from mapprune.runs import load_run

    times, out = run("fmt_recipe_cost.py", ["--run", runs["badnets"], "--n", "8", "--apart"], capsys)
    layers = len(map_layers(load_run(runs["badnets"]).model))
    assert out.startswith(f"{layers} layers, ")
    printed = table(out)
    assert len(printed) == len(times) == 6
    paper = times["paper (one mse probe)"]
    for row in printed:
        seconds = times[row["testing phase"]]
        assert seconds > 0 and row["time"] == f"{seconds:.2f} s" and row["vs paper"] == f"{seconds / paper:.2f}x"
    assert "fields judged on 8 images" in out  # field_images (16) capped at the 8 test images
    times, out = run("fmt_recipe_cost.py", ["--width", "4", "--n", "4", "--layer-stride", "5"], capsys)
    assert out.startswith("4 layers, ") and len(times) == 5  # 20 convolutions of PreActResNet18, every 5th
    assert "must be >= 1" in refused("fmt_recipe_cost.py", ["--n", "0"], capsys)


def test_fmt_speed_extrapolates_per_map(capsys):
    results, out = run("fmt_speed.py", ["--widths", "4", "--n", "4", "--maps", "2", "--ref-maps", "1",
                                        "--layer-stride", "5", "--device", "cpu"], capsys)
    r = results[4]
    assert r["maps"] == 4 + 8 + 16 + 32  # one convolution of each stage at width 4
    assert f"{len([0, 5, 10, 15])} conv layers timed (stride 5), {r['maps']} maps" in out
    for k in ("fast", "reference", "floor"):
        assert r[k] > 0 and f"{r[k]:9.2f} s  ({1000 * r[k] / r['maps']:7.3f} ms/map)" in out
    assert f"fast vs reference: {r['reference'] / r['fast']:.2f}x faster" in out
    assert "must be >= 1" in refused("fmt_speed.py", ["--maps", "0"], capsys)
    if not torch.cuda.is_available():
        assert "no CUDA GPU" in refused("fmt_speed.py", ["--device", "cuda"], capsys)


def test_guard_overhead_times_the_guarded_model_beside_the_bare_one(digits_backdoor, capsys):
    results, out = run("guard_overhead.py", ["--run", digits_backdoor[0], "--detectors", "fmt", "ibd-psc", "--images",
                                             "64", "--batch-size", "32", "--repeats", "1", "--device", "cpu"], capsys)
    rows = table(out)
    assert [r["detector"] for r in rows] == ["fmt", "ibd-psc"] and results["fmt"]["forward_passes"] == 1
    for row in rows:
        r = results[row["detector"]]
        assert r["bare_ms"] > 0 and r["guarded_ms"] > 0 and row["passes/image"] == str(r["forward_passes"])
        assert row["guarded / bare"] == f"{r['guarded_ms'] / r['bare_ms']:.2f}x"
    assert out.startswith(f"{digits_backdoor[0]}: 64 clean test images in batches of 32")
    results, out = run("guard_overhead.py", ["--detectors", "scale-up", "--images", "16", "--repeats", "1",
                                             "--epochs", "1", "--device", "cpu"], capsys)
    assert out.startswith("clean smallcnn on the digits (epochs: 1)") and results["scale-up"]["forward_passes"] == 6
    assert "must be >= 1" in refused("guard_overhead.py", ["--images", "0"], capsys)
    assert "unknown detector 'nope'" in refused("guard_overhead.py", ["--detectors", "nope"], capsys)


def test_train_throughput_compares_loop_and_bare(capsys):
    t, out = run("train_throughput.py", ["--width", "4", "--images", "64", "--batch-size", "32", "--repeats", "1",
                                         "--device", "cpu"], capsys)
    assert f"training loop : {64 / t['loop_s']:8.1f} images/s" in out
    assert f"bare fwd+bwd  : {64 / t['bare_s']:8.1f} images/s" in out
    assert f"ratio loop/bare time: {t['loop_s'] / t['bare_s']:.3f}" in out
    assert "must be >= 1" in refused("train_throughput.py", ["--images", "0"], capsys)
    assert "unknown model" in refused("train_throughput.py", ["--model", "nope"], capsys)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible: the GPU runs of fmt_speed.py and "
                                                          "train_throughput.py are skipped (their CPU runs are tested)")
def test_speed_scripts_on_the_gpu(capsys):
    results, out = run("fmt_speed.py", ["--widths", "8", "--n", "8", "--maps", "4", "--ref-maps", "2",
                                        "--layer-stride", "5", "--device", "cuda"], capsys)
    assert "device cuda" in out and results[8]["fast"] > 0
    t, out = run("train_throughput.py", ["--width", "8", "--images", "256", "--batch-size", "64", "--repeats", "1",
                                         "--device", "cuda"], capsys)
    assert "device cuda" in out and t["loop_s"] > 0


def test_allocator_compares_fresh_processes(capsys):
    results, out = run("allocator.py", ["--repeats", "1", "--workloads", "probe", "--width", "4", "--images", "4",
                                        "--layer-stride", "8"], capsys)
    r = results["probe"]
    printed = table(out)
    assert [row["allocator"] for row in printed] == ["glibc default", "as the command line sets it", "speed-up"]
    assert printed[0]["freed memory kept"] == "no"  # MAPPRUNE_ALLOCATOR=system took effect in the worker
    assert printed[1]["freed memory kept"] == ("yes" if r["kept"]["kept"] else "no")
    if sys.platform.startswith("linux") and not os.environ.get("LD_PRELOAD"):
        assert r["kept"]["kept"], "the worker run as the command line sets it did not keep freed memory"
    assert printed[0]["best s"] == f"{r['system']['s']:.3f}" and printed[1]["best s"] == f"{r['kept']['s']:.3f}"
    assert printed[2]["best s"] == f"{r['system']['s'] / r['kept']['s']:.2f}x"
    assert "unknown workload 'nope'" in refused("allocator.py", ["--workloads", "probe,nope"], capsys)
    assert "must be >= 1" in refused("allocator.py", ["--repeats", "0"], capsys)


def test_bench_jobs_times_both_settings(runs, tmp_path, capsys):
    grid = tmp_path / "adopt.toml"  # adopts a finished model: the cells are one cheap defense
    grid.write_text(f'name = "adopt"\ndataset = "digits"\npreset = "demo"\nseeds = [0]\n\n[[attack]]\nname = "badnets"\n'
                    f'run = {json.dumps(str(runs["badnets"]))}\n\n[[defense]]\nname = "clp"\n')
    walls, out = run("bench_jobs.py", ["--grid", grid, "--repeats", "1"], capsys)
    assert len(re.findall(r"^repeat 0: ", out, re.M)) == 2
    for name, w in walls.items():
        assert len(w) == 1 and f"repeat 0: {name}: {w[0]:.2f} s" in out and f"{name}: median {w[0]:.2f} s" in out
    a, b = walls
    assert f"throughput {a} / {b}: {walls[b][0] / walls[a][0]:.2f}x" in out
    assert "no grid file" in refused("bench_jobs.py", ["--grid", tmp_path / "none.toml"], capsys)
    assert "--repeats must be >= 1" in refused("bench_jobs.py", ["--grid", grid, "--repeats", "0"], capsys)
