"""`mapprune report --seeds`: a defense variant's seeds grouped, with mean, sample sd and range."""

import pytest

from mapprune.report import markdown_seed_table, seed_summary


def row(defense, seed, acc, asr, ra=0.5, run="r1"):
    return {"run": run, "attack": "badnets", "dataset": "cifar10", "defense": defense, "seed": seed,
            "acc": acc, "asr": asr, "ra": ra}


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
