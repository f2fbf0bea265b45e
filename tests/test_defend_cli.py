"""`mapprune defend` / `eval --defense` / `report` on a real (digits) backdoored run."""

import json

import pytest

from mapprune.cli import main
from mapprune.jobs.attack import attack_run
from mapprune.runs import load_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    attack_run("badnets", out, dataset="digits", preset="demo", progress=False)
    return out


def test_defend_fmt_writes_result_model_and_figures(run, capsys):
    rc = main(["defend", "fmt", str(run), "--n-images", "16", "--fraction", "0.125", "--batch-size", "32", "--mask",
               "--no-progress"])
    assert rc == 0
    folder = run / "defense" / "fmt-fraction0.125-nimages16-batchsize32"  # named by its non-default options
    for name in ("model.safetensors", "result.json", "metrics.png", "scores.png", "adversarial.png"):
        assert (folder / name).is_file(), name
    r = json.loads((folder / "result.json").read_text())
    assert set(r) >= {"before", "after", "der", "pruned", "scores", "timings", "peak_memory_mb", "clean_subset"}
    assert r["num_pruned"] == sum(len(v) for v in r["pruned"].values()) > 0
    assert set(r["timings"]) >= {"test", "select", "prune", "finetune", "total"}
    assert r["clean_subset"]["ratio"] == 0.1 and r["params"]["mask"] is True
    assert r["after"]["asr"] < r["before"]["asr"]
    capsys.readouterr()
    assert main(["eval", str(run), "--defense", folder.name, "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    ev = json.loads(out[0])
    assert ev["asr"] == pytest.approx(r["after"]["asr"]) and ev["acc"] == pytest.approx(r["after"]["acc"])
    assert "class_acc" not in ev
    assert main(["eval", str(run), "--per-class", "--json"]) == 0
    per = json.loads(capsys.readouterr().out)
    counts = load_run(run).dataset.y_test.bincount().tolist()  # ACC is the count-weighted mean of the classes
    assert sum(a * c for a, c in zip(per["class_acc"], counts)) / sum(counts) == pytest.approx(per["acc"])
    assert main(["eval", str(run), "--per-class"]) == 0
    assert "ACC per class: 0: " in capsys.readouterr().out


def test_detect_only_changes_nothing_and_ft_uses_same_subset(run, capsys):
    assert main(["defend", "fmt", str(run), "--detect-only", "--no-progress"]) == 0
    folder = run / "defense" / "fmt-detect"
    r = json.loads((folder / "result.json").read_text())
    assert not (folder / "model.safetensors").exists()
    assert r["after"] == r["before"] and r["num_pruned"] > 0
    assert main(["defend", "ft", str(run), "--epochs", "2", "--no-progress"]) == 0
    ft = json.loads((run / "defense" / "ft-epochs2" / "result.json").read_text())
    assert ft["clean_subset"]["indices"] == r["clean_subset"]["indices"]
    assert ft["num_pruned"] == 0 and len(ft["history"]) == 2
    capsys.readouterr()
    assert main(["report", str(run)]) == 0
    table = capsys.readouterr().out
    assert "| fmt-detect |" in table and "| ft-epochs2 |" in table and "| none |" in table


def test_defense_seed_names_its_own_folder(run, capsys):
    """A seed sweep never collides with the default run: seed N != 0 goes to <variant>-seedN."""
    from mapprune.jobs.defend import variant_name

    assert variant_name("fmt", {"selection": "outlier", "mask": True, "seed": 2}) == "fmt-outlier-seed2"
    assert variant_name("fmt", {"recipe": "paper", "mask": True}) == "fmt-paper-mask"
    assert variant_name("fmt", {"mask": False, "eps": 0.1, "n_images": 64}) == "fmt-nomask-eps0.1-nimages64"
    assert variant_name("fmt", {"recipe": "paper", "epochs": 10, "lr": 0.01}) == "fmt-paper"  # the recipe's own
    assert variant_name("ft", {"seed": 0}) == "ft"
    assert variant_name("fmt", {"gate": True}) == "fmt-gate" and variant_name("fmt", {"gate": None}) == "fmt"
    assert variant_name("ft", {"recipe": "paper", "seed": 1}) == "ft-paper-seed1"
    assert main(["defend", "ft", str(run), "--epochs", "1", "--no-progress", "--name", "s0"]) == 0
    assert main(["defend", "ft", str(run), "--epochs", "1", "--no-progress", "--seed", "1"]) == 0
    s0 = json.loads((run / "defense" / "s0" / "result.json").read_text())
    s1 = json.loads((run / "defense" / "ft-epochs1-seed1" / "result.json").read_text())
    assert s1["clean_subset"]["indices"] != s0["clean_subset"]["indices"]
    capsys.readouterr()
    assert main(["report", str(run), "--seeds", "--json"]) == 0
    groups = {g["defense"]: g for g in json.loads(capsys.readouterr().out)}
    assert 1 in groups["ft-epochs1"]["seeds"] and "ft-epochs1-seed1" not in groups and groups["s0"]["seeds"] == [0]


def test_defend_bad_input(run, capsys, tmp_path):
    assert main(["defend", "magic", str(run)]) == 2
    assert "valid defenses" in capsys.readouterr().err
    assert main(["defend", "ft", str(run), "--mask"]) == 2
    assert "fmt only" in capsys.readouterr().err
    assert main(["defend", "ft", str(run), "--gate"]) == 2
    assert "fmt only" in capsys.readouterr().err
    assert main(["defend", "fmt", str(run), "--gate", "--opt", "stimulate=0"]) == 2
    assert "stimulate" in capsys.readouterr().err
    assert main(["defend", "fmt", str(tmp_path / "nothing")]) == 2
    assert "not a mapprune run folder" in capsys.readouterr().err
    assert main(["eval", str(run), "--defense", "nope"]) == 2
    assert "mapprune defend nope" in capsys.readouterr().err
    main(["defend", "ft", str(run), "--epochs", "1", "--no-progress", "--name", "once"])
    capsys.readouterr()
    assert main(["defend", "ft", str(run), "--epochs", "1", "--no-progress", "--name", "once"]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_attack_options_reach_the_attack(tmp_path, capsys):
    out = tmp_path / "blend"
    argv = ["attack", "blended", "--dataset", "digits", "--preset", "demo", "--epochs", "1", "--no-progress",
            "--out", str(out)]
    assert main(argv + ["--attack-opt", "alpha=0.3"]) == 0
    assert json.loads((out / "manifest.json").read_text())["attack"]["alpha"] == 0.3
    capsys.readouterr()
    assert main(argv + ["--overwrite", "--attack-opt", "bogus=1"]) == 2
    assert "bogus" in capsys.readouterr().err
    assert main(argv + ["--overwrite", "--attack-opt", "alpha"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err


def test_defend_recipe_paper_is_named_and_recorded(run, capsys):
    assert main(["defend", "fmt", str(run), "--recipe", "paper", "--epochs", "1", "--no-progress"]) == 0
    r = json.loads((run / "defense" / "fmt-paper-epochs1" / "result.json").read_text())
    assert r["recipe"] == "paper" and r["params"]["objective"] == "mse" and r["params"]["selection"] == "rank"
    assert r["params"]["mask"] is False and r["params"]["lr"] == 0.01 and r["params"]["epochs"] == 1
    assert set(r["suspected_target"]) == {"target", "anomaly_index", "class_pull"}
    assert "suspected target class" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:  # argparse refuses it before any work
        main(["defend", "fmt", str(run), "--recipe", "best"])
    assert e.value.code == 2


def test_defend_states_each_detection_sign_by_the_scans_lines():
    from mapprune.commands.defend import detection_lines

    pull = [0.0, 0.1, 0.62, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    r = {"params": {"objective": "patch"}, "suspected_target": {"target": 2, "anomaly_index": 9.3, "class_pull": pull},
         "fine_tune": {"lr": 0.02, "rejected_classes": [0], "class_acc": [0.0] + [0.9] * 9},
         "stimulated_target": {"target": 0, "anomaly_index": 6.2, "class_pull": pull}}
    probes, rejected, stimulation = detection_lines(r)
    assert probes.startswith("suspected target class 2") and "62%" in probes and "over the scan's 50%" in probes
    assert rejected.startswith("class 0 rejected") and "0%" in rejected and "90%" in rejected
    assert "class 0" in stimulation and "over the scan's 4" in stimulation
    # The paper's mse probe pulls on another scale: no verdict line for it, and no rejected class, no lines.
    paper = {"params": {"objective": "mse"}, "fine_tune": {"lr": 0.01, "rejected_classes": [], "class_acc": [0.9] * 10},
             "suspected_target": {"target": 2, "anomaly_index": 9.3, "class_pull": pull}}
    (line,) = detection_lines(paper)
    assert "scan" not in line
    # A fine-tune that diverged is named, with what to do about it.
    paper["fine_tune"]["diverged"] = {"first_loss": 0.63, "peak_loss": 7.14, "peak_epoch": 3, "last_loss": 4.59, "lr": 0.01}
    gated = {"gate": {"open": False, "signs": []}}
    assert detection_lines(gated)[0].startswith("gate closed")
    gated["gate"] = {"open": True, "signs": ["patch_pull", "stimulation"]}
    assert detection_lines(gated)[0].startswith("gate open (patch_pull, stimulation)")
    warning = detection_lines(paper)[-1]
    assert warning.startswith("warning: the fine-tune diverged") and "0.63" in warning and "7.14 in epoch 3" in warning
    assert "--lr" in warning
