"""`mapprune report --seeds`: a defense variant's seeds grouped, with mean, sample sd and range."""

import json

import pytest

from mapprune.results import collect_rows, defense_row, markdown_seed_table, model_row, seed_summary

MANIFEST = {"attack": {"name": "badnets"}, "dataset": {"name": "cifar10"},
            "metrics": {"acc": 0.85, "asr": 0.95, "ra": 0.04}, "timings": {"train_s": 10.0}}


def row(defense, seed, acc, asr, ra=0.5, run="r1"):
    """A report row as read from a run folder (defense "none") or a defense's result.json named ``defense``."""
    if defense == "none":
        return {"run": run, **model_row({**MANIFEST, "metrics": {"acc": acc, "asr": asr, "ra": ra}})}
    result = {"name": defense, "clean_subset": {"seed": seed}, "after": {"acc": acc, "asr": asr, "ra": ra},
              "before": MANIFEST["metrics"], "der": 0.5, "num_pruned": 3, "wall_s": 1.0, "timings": {}}
    return {"run": run, **defense_row(result, attack="badnets", dataset="cifar10")}


def test_seeds_of_one_variant_are_grouped_and_others_kept_apart():
    rows = [row("none", None, 0.85, 0.95), row("fmt", 0, 0.84, 0.10), row("fmt-mask", 0, 0.83, 0.20),
            row("fmt-seed1", 1, 0.82, 0.30), row("fmt-seed2", 2, 0.86, 0.20), row("fmt", 0, 0.5, 0.5, run="r2"),
            row("custom-seed7", 3, 0.8, 0.8)]  # a --name that merely looks like a seed suffix stays whole
    groups = seed_summary(rows)
    names = [(g["run"], g["defense"], g["seeds"]) for g in groups]
    assert names == [("r1", "none", [None]), ("r1", "fmt", [0, 1, 2]), ("r1", "fmt-mask", [0]),
                     ("r2", "fmt", [0]), ("r1", "custom-seed7", [3])]
    fmt = groups[1]
    assert fmt["asr"]["mean"] == pytest.approx(0.2) and fmt["asr"]["sd"] == pytest.approx(0.1)  # sample sd
    assert (fmt["asr"]["min"], fmt["asr"]["max"]) == (0.1, 0.3)
    assert fmt["acc"]["mean"] == pytest.approx(0.84) and fmt["acc"]["sd"] == pytest.approx(0.02)
    assert groups[0]["asr"]["sd"] is None  # one value: no spread claimed
    table = markdown_seed_table(groups).splitlines()
    assert "| r1 | badnets | fmt | 0, 1, 2 | 84.00 ± 2.00 | 20.00 ± 10.00 | 10.00-30.00 |" in table[3]
    assert "| r1 | badnets | none | - | 85.00 | 95.00 |  |" in table[2]


def test_a_resumed_run_reports_all_its_training_time(tmp_path):
    def write(name, timings):
        (tmp_path / name).mkdir()
        m = {"attack": {"name": "lc"}, "dataset": {"name": "cifar10"}, "metrics": {"acc": 0.8, "asr": 1.0, "ra": 0.0},
             "timings": timings}
        (tmp_path / name / "manifest.json").write_text(json.dumps(m))
        return tmp_path / name

    whole = write("whole", {"train_s": 1000.0, "train_epochs_s": 950.0})  # evaluations on top of the epochs
    resumed = write("resumed", {"train_s": 700.0, "train_epochs_s": 1530.0})  # the last of three pieces
    old = write("old", {"train_s": 900.0})  # a manifest from before train_epochs_s
    assert [r["wall_s"] for r in collect_rows([whole, resumed, old])] == [1000.0, 1530.0, 900.0]
