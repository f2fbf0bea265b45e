"""`mapprune cleanse`: poisoned-training-sample detection. Each detector on synthetic Gaussian features with a planted
cluster, then on real BadNets digits models (the poisons ranked first, a clean
model's data not flagged beyond the calibrated rate), the command's files and one-line refusals, and retraining on
the cleansed set with ``mapprune attack --exclude``."""

import contextlib
import io
import json
import math
import shutil

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from mapprune.cleanse import SAMPLE_DETECTORS, SampleData, SampleDetector, create_sample_detector, robust_z
from mapprune.cleanse.base import one_sided_anomaly
from mapprune.cli import main
from mapprune.data import clean_subset
from mapprune.errors import MapPruneError
from mapprune.jobs.attack import attack_run, read_exclusion
from mapprune.jobs.cleanse import cleanse
from mapprune.runs import load_run


# -- synthetic features -----------------------------------------------------------------------------------------------
def planted(seed: int = 0, n: int = 300, classes: int = 4, dims: int = 20, share: float = 0.1, shift: float = 6.0,
            wide: float = 1.0):
    """Gaussian classes (unit variance, one direction ``wide`` times wider) with a cluster of ``share`` of class 0
    moved by ``shift`` along another direction. The clean images are 20% of each class's clean rows, as the defender's
    clean subset is part of the training set. Returns (data, planted mask, labels)."""
    rng = np.random.default_rng(seed)
    means = rng.normal(0, 4, (classes, dims))
    scale = np.ones(dims)
    scale[0] = wide
    x = np.concatenate([means[c] + rng.normal(size=(n, dims)) * scale for c in range(classes)])
    y = np.repeat(np.arange(classes), n)
    poisoned = np.zeros(len(y), dtype=bool)
    poisoned[rng.choice(n, int(share * n), replace=False)] = True
    x[poisoned, 1] += shift
    fit = np.concatenate([rng.choice(np.flatnonzero((y == c) & ~poisoned), n // 5, replace=False)
                          for c in range(classes)])
    data = SampleData.from_features(x, y, classes, fit_features=x[fit], fit_labels=y[fit], fit_positions=fit)
    return data, poisoned, y


def auroc_in_class0(detection, poisoned, y) -> float:
    return roc_auc_score(poisoned[y == 0], detection.scores[y == 0])


def test_spectral_signatures_rank_the_planted_cluster_first_unless_a_clean_direction_is_wider():
    data, poisoned, y = planted()
    found = create_sample_detector("ss").detect(data)
    assert auroc_in_class0(found, poisoned, y) > 0.999 and found.suspected_target == 0
    # the paper's rule: ceil(1.5 x 0.1 x 300) = 45 per class; the planted 30 are among class 0's
    assert (found.flags["every-class"] & poisoned).sum() == 30 and found.flags["every-class"].sum() == 4 * 45
    # a clean direction of variance 9 beats the cluster's 1 + 0.09 x 36: the top singular vector is the clean one
    wide, poisoned, y = planted(wide=3.0)
    assert auroc_in_class0(create_sample_detector("ss").detect(wide), poisoned, y) < 0.6


def test_spectre_ranks_the_planted_cluster_first_even_behind_a_wider_clean_direction():
    for w in (1.0, 3.0):
        data, poisoned, y = planted(wide=w)
        found = create_sample_detector("spectre").detect(data)
        assert auroc_in_class0(found, poisoned, y) > 0.99 and found.suspected_target == 0
        flagged = found.flags["target"]
        assert (flagged & poisoned).sum() == 30 and not (flagged & (y != 0)).any()


def test_scan_flags_only_the_planted_class():
    data, poisoned, y = planted()
    found = create_sample_detector("scan").detect(data)
    assert found.details["flagged_classes"] == [0] and found.suspected_target == 0
    assert auroc_in_class0(found, poisoned, y) == 1.0
    flagged = found.flags["anomaly"]
    assert (flagged & poisoned).sum() == 30 and (flagged & ~poisoned).sum() <= 2
    # without a planted cluster no class stands out
    clean, _, _ = planted(share=0.0)
    assert create_sample_detector("scan").detect(clean).details["flagged_classes"] == []


@pytest.mark.parametrize("reduce", ["ica", "pca"])
def test_activation_clustering_splits_the_planted_cluster_off(reduce):
    data, poisoned, y = planted(shift=10.0)
    found = create_sample_detector("ac", reduce=reduce).detect(data)
    assert found.details["classes"][0]["cluster_sizes"] in ([270, 30], [30, 270])
    assert np.array_equal(found.flags["size"], poisoned)  # only the planted cluster is under 35% of its class
    assert np.array_equal(found.flags["clean"], poisoned)  # and it holds none of the clean images
    assert found.suspected_target == 0


def test_the_expected_rule_flags_the_declared_share_of_comparable_scores():
    data, poisoned, _ = planted()
    for name in ("ss", "ac", "spectre", "scan"):
        found = create_sample_detector(name, expected=0.05).detect(data)
        assert found.flags["expected"].sum() == math.ceil(0.05 * data.n), name
        assert (found.flags["expected"] & poisoned).sum() >= 25, name  # the planted 30 score highest in any class


def test_the_anomaly_index_is_one_sided():
    """A class with an unusually small statistic is not suspicious; an unusually large one is."""
    low = [1.0, 1.1, 0.9, 1.0, 0.01]
    assert robust_z(np.array(low))[4] < -5 and one_sided_anomaly(low)[4] == 0
    high = one_sided_anomaly([1.0, 1.1, 0.9, 1.0, 5.0])
    assert high.argmax() == 4 and high[4] > 20


def test_detector_settings_are_checked_by_name_and_type():
    assert list(SAMPLE_DETECTORS) == ["ss", "ac", "spectre", "scan", "fmt"]
    with pytest.raises(MapPruneError, match="the ac detector has no option 'bins'"):
        create_sample_detector("ac", bins=3)
    with pytest.raises(MapPruneError, match="the spectre detector: alpha must be a positive number"):
        create_sample_detector("spectre", alpha=-1.0)
    with pytest.raises(MapPruneError, match="unknown sample detector 'strip'"):
        create_sample_detector("strip")
    with pytest.raises(MapPruneError, match="needs the fit"):  # SCAn's global model needs clean features
        create_sample_detector("scan").detect(SampleData.from_features(np.zeros((4, 2)), [0, 0, 1, 1]))
    with pytest.raises(MapPruneError, match="SampleDetector subclass"):
        SAMPLE_DETECTORS.register(type("Nameless", (SampleDetector,), {}))


# -- digits: real BadNets models --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cleansed(digits_backdoor, tmp_path_factory):
    """The command on a copy of the 10% BadNets digits run: AC, SCAn and the FMT-guided detector (the target class
    is half poison there, outside what Spectral Signatures and SPECTRE are built for; they are tested at 5%)."""
    run = tmp_path_factory.mktemp("cleanse") / "badnets"
    shutil.copytree(digits_backdoor[0], run)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["cleanse", str(run), "--detector", "ac", "scan", "fmt", "--no-progress"]) == 0
    results = {name: json.loads((run / "cleanse" / name / "result.json").read_text()) for name in ("ac", "scan", "fmt")}
    return run, results, printed.getvalue()


@pytest.fixture(scope="module")
def digits_five_percent(tmp_path_factory):
    """A BadNets digits run with 5% of the training set poisoned: the target class is a third poison."""
    out = tmp_path_factory.mktemp("digits5") / "badnets"
    attack_run("badnets", out, dataset="digits", preset="demo", progress=False, poison_ratio=0.05)
    return out


def test_the_command_writes_scores_flags_and_measurements(cleansed):
    run, results, printed = cleansed
    rows = {line.split()[0]: line.split() for line in printed.splitlines()[2:] if line.startswith("  ") and
            line.split()[0] in results}
    assert set(rows) == {"ac", "scan", "fmt"} and "written to" in printed.splitlines()[-1]
    for name, r in results.items():
        assert rows[name][1] == r["rule"] and int(rows[name][2]) == r["evaluation"]["rules"][r["rule"]]["flagged"]
        folder = run / "cleanse" / name
        flagged = json.loads((folder / "flagged.json").read_text())
        assert flagged["indices"] == flagged["rules"][r["rule"]] and r["flagged"] == len(flagged["indices"])
        assert set(flagged["rules"]) >= {r["rule"], "expected"} and (folder / "scores.safetensors").is_file()
        ev = r["evaluation"]
        assert ev["target"] == 0 and ev["poisons"] + ev["poisons_in_clean_subset"] == 126
        assert ev["poisons"] + ev["clean"] == 1258 - r["clean_subset"]["count"]  # the clean subset is not measured
        assert not list(folder.glob(".*tmp*"))


def test_on_the_digits_backdoor_the_poisons_rank_first(cleansed):
    """Measured (seed 0; the ranges: the same seed's model trained on two CPUs, whose float rounding differs): AUROC
    inside the target class AC 0.946-0.962, SCAn 0.831-1.000, FMT-guided 0.987-0.997 (over all classes
    0.970-0.99); the FMT-guided calibrated rule flagged 104-107 of the 109 measured poisons and 1-10 clean images.
    SCAn is the least stable: over attack seeds 0-2 on one CPU its AUROC inside the target class is 0.79-0.89,
    always naming class 0."""
    _, r, _ = cleansed
    assert r["ac"]["evaluation"]["auroc_target"] > 0.93
    assert r["scan"]["evaluation"]["auroc_target"] > 0.75 and r["scan"]["suspected_target"] == 0
    fmt = r["fmt"]
    assert fmt["suspected_target"] == 0 and fmt["evaluation"]["auroc_target"] > 0.98 and fmt["evaluation"]["auroc"] > 0.95
    calibrated = fmt["evaluation"]["rules"]["calibrated"]
    assert calibrated["tpr"] > 0.9 and calibrated["precision"] > 0.9 and calibrated["fpr"] < 0.02


def test_at_five_percent_spectral_signatures_and_spectre_rank_the_poisons_first(digits_five_percent):
    """Measured (seed 0, the model trained on two CPUs whose float rounding differs): SPECTRE on the penultimate
    features 0.891-0.975 inside the target class, its target rule on class 0 with TPR 0.89-0.96 (attack seeds 1
    and 2 on one CPU: 0.922 and 0.956, but seed 2's rule names class 8); Spectral Signatures 0.953 on the last
    block's pooled maps (net.features.6; 0.61-0.86 on the penultimate features, whose 64 values mix the trigger
    with the digit)."""
    spectre = cleanse(digits_five_percent, detectors=["spectre"])["spectre"]
    assert spectre["suspected_target"] == 0 and spectre["evaluation"]["auroc_target"] > 0.85
    assert spectre["evaluation"]["rules"]["target"]["tpr"] > 0.85
    ss = cleanse(digits_five_percent, detectors=["ss"], layer="net.features.6")["ss"]
    assert ss["layer"] == "net.features.6" and ss["evaluation"]["auroc_target"] > 0.93


def test_a_clean_models_data_is_flagged_at_about_the_calibrated_rate(tmp_path):
    """No backdoor: FMT still names a suspected target, and the calibrated rule flags the clean images of that class
    at about its false-positive rate (5%). Measured over three clean-subset draws: 7.1%, 0.0%, 7.1%."""
    run = tmp_path / "clean"
    attack_run("badnets", run, dataset="digits", preset="demo", progress=False, poison_ratio=0.0)
    labels = load_run(run).dataset.y_train
    shares = []
    for seed in (0, 1, 2):
        r = cleanse(run, detectors=["fmt"], seed=seed)["fmt"]
        assert r["evaluation"]["poisons"] == 0 and r["evaluation"]["auroc"] is None
        subset = clean_subset(labels, 0.1, seed).numpy()
        in_class = np.setdiff1d(np.flatnonzero(labels.numpy() == r["suspected_target"]), subset)
        flagged = json.loads((run / "cleanse" / "fmt" / "flagged.json").read_text())["indices"]
        assert set(flagged) <= set(in_class.tolist()) | set(subset.tolist())  # flags fall in the suspected class only
        shares.append(len(np.intersect1d(flagged, in_class)) / len(in_class))
        assert r["evaluation"]["rules"]["calibrated"]["fpr"] < 0.05
    assert np.mean(shares) < 0.1 and max(shares) < 0.15


@pytest.mark.parametrize("args, message", [
    (["--detector", "strip"], "unknown sample detector 'strip'"),
    (["--expected", "0.7"], "--expected is the declared share of poisoned training images, in (0, 0.5]"),
    (["--layer", "net.layer9"], "--layer 'net.layer9' is not a module of the model"),
    (["--opt", "bins=3"], "no chosen detector (ss, ac, spectre, scan, fmt) takes the option 'bins'"),
    (["--detector", "ac", "--opt", "reduce=tsne"], "the ac detector: reduce is one of ica, pca"),
    (["--opt", "seed=3"], "--opt seed= is a setting of every detector; give it as --seed"),
    (["--clean-ratio", "0"], "--clean-ratio is the defender's clean share of the training set"),
])
def test_bad_options_are_one_line_before_any_work(digits_backdoor, capsys, args, message):
    assert main(["cleanse", str(digits_backdoor[0]), *args, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (digits_backdoor[0] / "cleanse").exists()


# -- retraining on the cleansed set -----------------------------------------------------------------------------------
def test_retraining_without_the_flagged_images_removes_the_backdoor(cleansed, digits_backdoor, tmp_path):
    """Measured: ASR 0.95 -> 0.004 at ACC 0.993 after leaving out the FMT-guided detector's 123 flags (122 poisons)."""
    run, _, _ = cleansed
    before = digits_backdoor[1].manifest["metrics"]
    out = tmp_path / "retrained"
    m = attack_run("badnets", out, dataset="digits", preset="demo", progress=False,
                   exclude=run / "cleanse" / "fmt" / "flagged.json")
    flagged = json.loads((run / "cleanse" / "fmt" / "flagged.json").read_text())["indices"]
    assert m["exclude"]["indices"] == flagged and m["exclude"]["count"] == len(flagged)
    assert m["exclude"]["poisons"] + m["exclude"]["poisons_trained"] == m["poison"]["count"] == 126
    assert m["exclude"]["poisons"] >= 115
    assert before["asr"] > 0.9 and m["metrics"]["asr"] < 0.1 and m["metrics"]["acc"] > before["acc"] - 0.02
    # cleanse reads a run trained with --exclude as it was trained: without the excluded images
    again = cleanse(out, detectors=["ss"])["ss"]
    assert again["training_images"] == 1258 - len(flagged)


def test_exclusion_files_are_json_lists_or_flagged_files_checked_in_one_line(digits_backdoor, tmp_path, capsys):
    (tmp_path / "list.json").write_text("[5, 3, 3]")
    (tmp_path / "flagged.json").write_text(json.dumps({"indices": [3, 5], "rules": {}}))
    assert read_exclusion(tmp_path / "list.json") == read_exclusion(tmp_path / "flagged.json") == [3, 5]
    for name, text, message in [("range.json", "[1, 5000]", "names training index 5000; digits has 1258 training images"),
                                ("words.json", '{"a": [1]}', "holds no list of whole numbers"),
                                ("bools.json", "[true]", "holds no list of whole numbers"),
                                ("broken.json", "[1,", "is not readable JSON")]:
        (tmp_path / name).write_text(text)
        out = tmp_path / f"out-{name}"
        assert main(["attack", "badnets", "--dataset", "digits", "--preset", "demo", "--out", str(out), "--exclude",
                     str(tmp_path / name), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists() and not out.with_name(out.name + ".partial").exists()
