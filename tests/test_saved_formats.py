"""Saved files stay readable: a version-0 run folder (tests/fixtures/run-v0, written before manifest.json and
result.json carried ``schema_version``; its weights are not committed, the tests write seeded ones) is read by
every reader; new files carry the
current version; a file from a newer mapprune is refused in one line; version-0 results get the options added
since filled in with the values they were made with (mapprune.migrate); the defaults that name and match bench
cells are pinned."""

import json
import shutil
from pathlib import Path

import pytest

from mapprune.cli import main
from mapprune.defenses import DEFENSES, FineTuning, create_defense, defense_class
from mapprune.errors import MapPruneError, MapPruneWarning
from mapprune.jobs.defend import defend_run, find_result
from mapprune.migrate import (
    LEGACY_PARAMS,
    MANIFEST_STEPS,
    MANIFEST_VERSION,
    RESULT_STEPS,
    RESULT_VERSION,
    RETIRED,
    NewerFormat,
    expert_values,
    format1_params,
    upgrade_manifest,
    upgrade_result,
)
from mapprune.results import collect_rows
from mapprune.runs import load_run, read_manifest, read_result

FIXTURE = Path(__file__).parent / "fixtures" / "run-v0"
VARIANT = "ft-epochs1"  # the fixture's one defense result: `mapprune defend ft RUN --opt epochs=1`
METRICS = ("acc", "asr", "ra")


def _weights(run: Path) -> None:
    """Writes model.safetensors for the run and its defense result: the fixture holds no weights (none are ever
    committed), so the architecture its manifest names is built with seeded weights. The saved format is what is
    under test, not these numbers."""
    import torch

    from mapprune.checkpoint import save_model
    from mapprune.runs import model_from_manifest

    m = json.loads((run / "manifest.json").read_text())
    for i, path in enumerate((run / "model.safetensors", run / "defense" / VARIANT / "model.safetensors")):
        torch.manual_seed(i)
        save_model(model_from_manifest(m), path, {"model": m["model"]})


@pytest.fixture
def old(tmp_path) -> Path:
    """A private copy of the version-0 run folder, with seeded weights."""
    dst = tmp_path / "run-v0"
    shutil.copytree(FIXTURE, dst)
    _weights(dst)
    return dst


def stored(run: Path) -> tuple[dict, dict]:
    """The manifest and the defense result as the files hold them, read without mapprune."""
    return (json.loads((run / "manifest.json").read_text()),
            json.loads((run / "defense" / VARIANT / "result.json").read_text()))


def one_error_line(capsys, argv) -> str:
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert err.startswith("mapprune: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_the_fixture_is_version_0_and_small():
    m, r = stored(FIXTURE)
    assert "schema_version" not in m and "schema_version" not in r
    assert not list(FIXTURE.rglob("*.png")) and not list(FIXTURE.rglob("model.safetensors"))  # no weights committed
    assert sum(p.stat().st_size for p in FIXTURE.rglob("*") if p.is_file()) < 1_000_000


def test_a_version_0_run_is_loaded_and_evaluated(old, capsys):
    from mapprune.metrics import evaluate

    m, r = stored(old)
    run = load_run(old)
    assert run.manifest["schema_version"] == MANIFEST_VERSION
    assert run.manifest["metrics"] == m["metrics"] and run.manifest["dataset"]["registry"] == "digits"
    assert run.attack.config()["name"] == m["attack"]["name"] and len(run.poison_indices) == m["poison"]["count"]
    assert main(["eval", str(old), "--json", "--threads", "1"]) == 0
    now = json.loads(capsys.readouterr().out)
    assert {k: now[k] for k in METRICS} == {k: v for k, v in evaluate(run.model, run.test_sets()).items()
                                            if k in METRICS}
    assert main(["eval", str(old), "--defense", VARIANT, "--json", "--threads", "1"]) == 0
    assert set(json.loads(capsys.readouterr().out)) >= set(METRICS)


def test_a_version_0_run_is_reported_with_its_stored_metrics(old, capsys):
    m, r = stored(old)
    assert main(["report", str(old), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [row["defense"] for row in rows] == ["none", VARIANT]
    assert {k: rows[0][k] for k in METRICS} == m["metrics"]
    assert {k: rows[1][k] for k in METRICS} == r["after"] and rows[1]["der"] == r["der"]
    assert rows[1]["recipe"] == "recommended" and rows[1]["seed"] == 0
    assert collect_rows([old]) == rows


def test_a_version_0_result_is_found_and_adopted_with_its_settings(old, tmp_path):
    _, r = stored(old)
    params = create_defense("ft", epochs=1, hflip=False).params()
    assert find_result(old, "ft", params, 0.1, 0) == old / "defense" / VARIANT
    assert find_result(old, "ft", create_defense("ft", epochs=2, hflip=False).params(), 0.1, 0) is None
    assert find_result(old, "ft", params, 0.05, 0) is None
    target = tmp_path / "target"
    shutil.copytree(old, target, ignore=shutil.ignore_patterns("defense"))
    report = defend_run(target, "ft", epochs=1, progress=False, adopt_from=old, adopt_only=True)
    assert report["adopted_from"] == str(old / "defense" / VARIANT)
    saved = json.loads((target / "defense" / VARIANT / "result.json").read_text())
    assert saved["schema_version"] == RESULT_VERSION and saved["after"] == r["after"] and saved == report


def test_fresh_files_carry_the_current_schema_version(old, tmp_path):
    from mapprune.jobs.attack import attack_run

    m = attack_run("badnets", tmp_path / "fresh", dataset="digits", preset="demo", epochs=1, progress=False)
    on_disk = json.loads((tmp_path / "fresh" / "manifest.json").read_text())
    assert m["schema_version"] == on_disk["schema_version"] == MANIFEST_VERSION == 1
    report = defend_run(old, "ft", epochs=1, name="fresh", progress=False)
    on_disk = json.loads((old / "defense" / "fresh" / "result.json").read_text())
    assert report["schema_version"] == on_disk["schema_version"] == RESULT_VERSION == 1
    assert read_result(old / "defense" / "fresh") == on_disk  # the current version reads back unchanged


def _set(path: Path, **kw) -> None:
    d = json.loads(path.read_text())
    d.update(kw)
    path.write_text(json.dumps(d))


def test_a_manifest_from_a_newer_mapprune_is_refused_in_one_line(old, capsys):
    _set(old / "manifest.json", schema_version=99)
    with pytest.raises(NewerFormat, match="written by a newer mapprune .*upgrade mapprune"):
        load_run(old)
    for argv in (["eval", old], ["report", old]):
        err = one_error_line(capsys, argv)
        assert str(old / "manifest.json") in err and "schema_version 99" in err and "upgrade" in err


def test_a_result_from_a_newer_mapprune_is_refused_in_one_line(old, capsys):
    result = old / "defense" / VARIANT / "result.json"
    _set(result, schema_version=99)
    err = one_error_line(capsys, ["eval", old, "--defense", VARIANT])
    assert str(result) in err and "written by a newer mapprune" in err and "upgrade" in err
    with pytest.warns(MapPruneWarning, match="left out of the report: .*written by a newer mapprune"):
        assert [row["defense"] for row in collect_rows([old])] == ["none"]
    with pytest.raises(NewerFormat):  # adopting past it would compute a result that may exist already
        find_result(old, "ft", create_defense("ft", epochs=1, hflip=False).params(), 0.1, 0)


@pytest.mark.parametrize("version", ["1", -1, 1.0, True, None])
def test_a_schema_version_that_is_no_version_is_damage(old, version):
    _set(old / "manifest.json", schema_version=version)
    with pytest.raises(MapPruneError, match="manifest.json is damaged: 'schema_version' is"):
        read_manifest(old)


def _without(params: dict, keys) -> dict:
    return {k: v for k, v in params.items() if k not in keys}


def test_version_0_results_get_the_options_added_since_with_their_old_values(old):
    """FMT results saved before unlearn_each, unlearn_append, field_images, field_null and relearn_lr existed were
    made with the values in LEGACY_PARAMS; read, they say so, and they match exactly those settings."""
    full = create_defense("fmt", recipe="paper", hflip=False).params()
    old_full = {**format1_params("fmt", full), **expert_values("fmt", "paper")}
    assert {k: old_full[k] for k in LEGACY_PARAMS["fmt"]} == LEGACY_PARAMS["fmt"]  # the paper recipe is the old one
    _, r = stored(old)
    folder = old / "defense" / "fmt-paper"
    folder.mkdir()
    written = {**r, "name": "fmt-paper", "defense": "fmt", "params": _without(full, LEGACY_PARAMS["fmt"])}
    del written["recipe"]
    (folder / "result.json").write_text(json.dumps(written))
    got = read_result(folder)
    assert got["params"] == full and got["recipe"] == "paper" and got["schema_version"] == RESULT_VERSION
    assert upgrade_result(written) == got and "schema_version" not in written  # the input is left as it is
    assert find_result(old, "fmt", full, 0.1, 0) == folder
    assert find_result(old, "fmt", create_defense("fmt", hflip=False).params(), 0.1, 0) is None
    # the stimulation test only changes what is reported: any level stands for the same repair
    assert find_result(old, "fmt", {**full, "stimulate": 4.0, "stimulate_images": 10}, 0.1, 0) == folder
    assert [row["recipe"] for row in collect_rows([old]) if row["defense"] == "fmt-paper"] == ["paper"]
    # A current-version file says what it holds: nothing is filled in, and it matches no complete setting.
    (folder / "result.json").write_text(json.dumps({**written, "schema_version": RESULT_VERSION}))
    got = read_result(folder)
    assert got["params"] == written["params"] and "recipe" not in got
    assert find_result(old, "fmt", full, 0.1, 0) is None


def test_the_recipe_of_version_0_results_is_the_papers_only_for_fine_tunes():
    assert upgrade_result({"defense": "ft", "params": {"epochs": 10}})["recipe"] == "paper"
    assert "recipe" not in upgrade_result({"defense": "clp", "params": {"u": 3.0}})
    assert upgrade_result({"defense": "ft", "params": {"epochs": 10}, "recipe": "recommended"})["recipe"] == \
        "recommended"
    kept = upgrade_result({"defense": "ft", "params": {"epochs": 10, "relearn_lr": 0.02}})
    assert kept["params"]["relearn_lr"] == 0.02  # a saved value is never replaced
    assert upgrade_result({"params": "damaged"})["params"] == "damaged"  # left for the reader's check to name


def test_version_0_manifests_get_their_loaders_name():
    m = upgrade_manifest({"dataset": {"name": "digits", "num_classes": 10}})
    assert m == {"schema_version": 1, "dataset": {"registry": "digits", "data_dir": None, "name": "digits",
                                                  "num_classes": 10}}
    m = upgrade_manifest({"dataset": {"name": "my.npz", "registry": "npz", "data_dir": "/d"}})
    assert m["dataset"]["registry"] == "npz" and m["dataset"]["data_dir"] == "/d"
    assert upgrade_manifest({"dataset": "damaged"})["dataset"] == "damaged"


def test_each_version_has_its_step_and_legacy_options_are_options():
    assert len(MANIFEST_STEPS) == MANIFEST_VERSION and len(RESULT_STEPS) == RESULT_VERSION
    for name, legacy in LEGACY_PARAMS.items():
        assert set(legacy) <= set(defense_class(name).option_names()) | set(RETIRED.get(name, {})) \
            | set(expert_values(name, None)), name
    # every defense that ends with the shared fine-tune had it before relearn_lr existed
    assert {n for n, cls in DEFENSES.items() if issubclass(cls, FineTuning)} == set(LEGACY_PARAMS)
    assert all(not hasattr(cls, "legacy") for cls in DEFENSES.values())


# The resolved parameters of FMT and FT, as bench cells are named and matched by them: a renamed option or a changed
# default changes a cell, so it must change this literal too.
FINETUNE_COMMON = {"held_out": 0.2, "hflip": True, "seed": 0, "progress": False, "recipe": "recommended"}
FT_RECOMMENDED = {"epochs": 15, "lr": 0.01, "batch_size": 128, "weight_decay": 0.0005, "min_lr": 0.0,
                  "schedule": "onecycle", "nesterov": True, "distill": 1.0, "relearn_lr": 0.02}
FT_PAPER = {"epochs": 10, "lr": 0.01, "batch_size": 256, "weight_decay": 0.0, "min_lr": 0.0001,
            "schedule": "cosine", "nesterov": False, "distill": 0.0, "relearn_lr": 0.0}
FMT_OWN = {"alpha": 0.02, "fraction": 0.015625, "min_per_layer": 1, "max_drop": 0.1, "outlier_method": "elliptic",
           "contamination": 0.1, "threshold": 3.5, "unlearn_maps": 8, "stimulate_images": 30,
           "unlearn_candidates": "probe", "detect_only": False, "precision": "auto", "implementation": "fast",
           "batch_images": 1024}
FMT_RECOMMENDED = {"n_images": 32, "balanced": False, "eps": 0.06, "objective": "patch", "scorer": "accuracy",
                   "selection": "global", "mask": True, "unlearn": 0.2, "unlearn_warp": 1.0, "unlearn_smooth": 0.06,
                   "unlearn_each": True, "unlearn_append": False, "stimulate": 4.0, "field_images": 16}
FMT_PAPER = {"n_images": 32, "balanced": False, "eps": 0.06, "objective": "mse", "scorer": "accuracy",
             "selection": "rank", "mask": False, "unlearn": 0.0, "unlearn_warp": 0.0, "unlearn_smooth": 0.0,
             "unlearn_each": False, "unlearn_append": False, "stimulate": 0.0, "field_images": 0}
PINNED = {
    # defaults(recipe) fills the recipe's values but keeps the "recipe" entry of the signature ("recommended").
    ("ft", None): {**FINETUNE_COMMON, **FT_RECOMMENDED},
    ("ft", "paper"): {**FINETUNE_COMMON, **FT_PAPER},
    ("fmt", None): {**FINETUNE_COMMON, **FMT_OWN, **FT_RECOMMENDED, **FMT_RECOMMENDED},
    ("fmt", "paper"): {**FINETUNE_COMMON, **FMT_OWN, **FT_PAPER, **FMT_PAPER},
}


@pytest.mark.parametrize(("name", "recipe"), list(PINNED))
def test_resolved_parameters_are_pinned(name, recipe):
    assert format1_params(name, defense_class(name).defaults(recipe), defaults=True) == PINNED[(name, recipe)]


BENCH_FIXTURE = Path(__file__).parent / "fixtures" / "bench-digits-tiny-v0"


def test_a_bench_folder_of_version_0_files_is_read_to_the_same_table(tmp_path):
    """A digits-tiny bench folder written with version-0 manifests and results (its JSON, grid, results.csv and
    table.md checked in; no weights) is recognised cell by cell by today's grid (the cell keys did not move), and
    today's results pipeline writes the same table.md from it."""
    from mapprune.bench import load_grid, plan, write_results

    out = tmp_path / "bench"
    shutil.copytree(BENCH_FIXTURE, out)
    for manifest in (out / "runs").glob("*/manifest.json"):
        (manifest.parent / "model.safetensors").touch()  # weights are never committed; only their presence counts
    grid = load_grid(Path(__file__).resolve().parents[1] / "benchmarks" / "grids" / "digits-tiny.toml")
    cells = plan(grid, out)
    assert len(cells) == 14 and all(c.done() for c in cells), [c.label for c in cells if not c.done()]
    (out / "table.md").unlink()
    write_results(cells, grid, out)
    assert (out / "table.md").read_text() == (BENCH_FIXTURE / "table.md").read_text()
