"""A bench cell's key is a hash of its settings, and finished cells are found again by it: a change to how keys
are computed would silently recompute (or orphan) every finished cell of every bench folder. These tests pin the
keys, folder names and grid hashes of known grids to literal values."""

import json
from pathlib import Path

import pytest

from mapprune.bench import load_grid, plan, run_bench, select

GRIDS = Path(__file__).resolve().parents[1] / "benchmarks" / "grids"

FMT = "fmt-fraction0.125-batchsize32-distill0-epochs5"
FT = "ft-batchsize32-epochs5"
# (label, key) of every cell of benchmarks/grids/digits-tiny.toml.
DIGITS_KEYS = [
    ("badnets", "300e29d557"),
    ("badnets / clp / seed 0", "235a320822"),
    ("badnets / clp / seed 1", "bf7e9b7127"),
    (f"badnets / {FMT} / seed 0", "b967a520a5"),
    (f"badnets / {FMT} / seed 1", "5d0d09015d"),
    (f"badnets / {FT} / seed 0", "1ba98f293a"),
    (f"badnets / {FT} / seed 1", "698e673847"),
    ("blended", "0e955ccab7"),
    ("blended / clp / seed 0", "761813f580"),
    ("blended / clp / seed 1", "4f261196c9"),
    (f"blended / {FMT} / seed 0", "552fa295e9"),
    (f"blended / {FMT} / seed 1", "0fa85556e6"),
    (f"blended / {FT} / seed 0", "9cb2ba267b"),
    (f"blended / {FT} / seed 1", "f29958d6a7"),
]
# The cell folders (relative to the bench folder) of the same grid, in plan order.
DIGITS_FOLDERS = [
    f"runs/{model}" + (f"/defense/{folder}{seed}" if folder else "")
    for model in ("badnets-300e29d557", "blended-0e955ccab7")
    for folder, seeds in (("", [""]), (f"{FT}-1b49f3e215", ["", "-seed1"]), (f"{FMT}-883fe54cad", ["", "-seed1"]),
                          ("clp-29a7492099", ["", "-seed1"]))
    for seed in seeds
]

SWEEP = '''name = "sweep"
dataset = "digits"
preset = "demo"
seeds = [0]

[[attack]]
name = "badnets"

[[defense]]
name = "fmt"
opts = {fraction = 0.125, batch_size = 32, distill = 0.0, epochs = 3}
sweep = {fraction = [0.0625, 0.125, 0.25], clean_ratio = [0.05]}
'''
SWEPT = "fmt-fraction0.125-batchsize32-distill0-epochs3"
SWEEP_CELLS = [
    ("badnets", "300e29d557", "runs/badnets-300e29d557"),
    (f"badnets / {SWEPT} / seed 0", "527b517c7e", f"runs/badnets-300e29d557/defense/{SWEPT}-fa83987bac"),
    ("badnets / fmt-fraction0.0625-batchsize32-distill0-epochs3 / seed 0", "67e79e1e49",
     "runs/badnets-300e29d557/defense/fmt-fraction0.0625-batchsize32-distill0-epochs3-b2241e69a6"),
    ("badnets / fmt-fraction0.25-batchsize32-distill0-epochs3 / seed 0", "6d54e0005f",
     "runs/badnets-300e29d557/defense/fmt-fraction0.25-batchsize32-distill0-epochs3-c65c7b36f2"),
    (f"badnets / {SWEPT}-ratio0.05 / seed 0", "fe70fc19fd",
     f"runs/badnets-300e29d557/defense/{SWEPT}-ratio0.05-283d4da381"),
]

# The fmt-evasive-w0.5 row of benchmarks/grids/cifar10-adaptive.toml (the model and its six defenses): what
# ``--only fmt-evasive-w0.5`` runs, and what the row's run folder on disk was made under.
W05 = "runs/fmt-evasive-w0.5-97e23732cf"
ADAPTIVE_W05 = [
    ("fmt-evasive-w0.5", "97e23732cf", W05),
    ("fmt-evasive-w0.5 / fmt / seed 0", "1567d8a5fb", f"{W05}/defense/fmt-1dee94c71f"),
    ("fmt-evasive-w0.5 / fmt-paper / seed 0", "c48d68db2a", f"{W05}/defense/fmt-paper-f86afacb74"),
    ("fmt-evasive-w0.5 / fst / seed 0", "701dd1bbc3", f"{W05}/defense/fst-2bb925f941"),
    ("fmt-evasive-w0.5 / ft / seed 0", "ba3a22a38d", f"{W05}/defense/ft-31ee0f6558"),
    ("fmt-evasive-w0.5 / nc / seed 0", "6db99af956", f"{W05}/defense/nc-67810f5cab"),
    ("fmt-evasive-w0.5 / anp / seed 0", "b2658fcdd2", f"{W05}/defense/anp-943c70b1a8"),
]


def _quiet(*a, **k):
    pass


def test_the_cell_keys_of_the_digits_grid_are_pinned(tmp_path):
    cells = plan(load_grid(GRIDS / "digits-tiny.toml"), tmp_path)
    assert sorted((c.label, c.key) for c in cells) == DIGITS_KEYS
    assert [str(Path(c.path).relative_to(tmp_path)) for c in cells] == DIGITS_FOLDERS
    models = {c.attack: c.key for c in cells if c.kind == "model"}
    assert all(c.deps == [models[c.attack]] for c in cells if c.kind == "defense")


def test_the_cell_keys_of_a_sweep_are_pinned(tmp_path):
    (tmp_path / "sweep.toml").write_text(SWEEP)
    cells = plan(load_grid(tmp_path / "sweep.toml"), tmp_path / "out")
    assert [(c.label, c.key, str(Path(c.path).relative_to(tmp_path / "out"))) for c in cells] == SWEEP_CELLS


def test_the_grid_hash_of_bench_json_is_pinned(tmp_path):
    """bench.json's grid_hash (which names the grid that made a folder) covers the expanded defenses and the
    sweeps but not the published numbers beside them; adopt-only writes it without computing anything."""
    (tmp_path / "sweep.toml").write_text(SWEEP)
    (tmp_path / "ref.toml").write_text('name = "x"\n[cells]\nbadnets = {none = [90.0, 95.5, 4.0]}\n')
    (tmp_path / "ref-sweep.toml").write_text(SWEEP.replace('seeds = [0]', 'seeds = [0]\nreference = "ref.toml"'))
    for grid, digest in ((GRIDS / "digits-tiny.toml", "ff921e3d96"), (tmp_path / "sweep.toml", "339fa3642d"),
                         (tmp_path / "ref-sweep.toml", "339fa3642d")):
        out = tmp_path / f"out-{grid.stem}"
        r = run_bench(grid, out, adopt_only=True, progress=False, log=_quiet)
        assert r["done"] == 0 and not r["failed"]
        assert json.loads((out / "bench.json").read_text())["grid_hash"] == digest, grid


def test_only_one_row_of_the_adaptive_grid_keeps_its_keys(shared_data, user_cache, monkeypatch, tmp_path):
    monkeypatch.setenv("MAPPRUNE_DATA", str(shared_data))
    monkeypatch.chdir(GRIDS.parents[1])  # the grid adopts ../shared/zoo/cifar10-badnets, relative to the root
    if not Path("../shared/zoo/cifar10-badnets/manifest.json").is_file():
        pytest.skip("the adaptive grid adopts the shared zoo's BadNets run, not found")
    grid = load_grid(GRIDS / "cifar10-adaptive.toml")
    cells = select(plan(grid, tmp_path), grid, ["fmt-evasive-w0.5"])
    assert [(c.label, c.key, str(Path(c.path).relative_to(tmp_path))) for c in cells] == ADAPTIVE_W05
