"""The calibrated scan: a rule whose threshold is set on clean models only, held-out error rates by trigger family
and architecture, the verdict "uncertain" near the threshold, and MM-BD as a data-free baseline."""

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mapprune.cli import main
from mapprune.detect.calibrate import Model, Rule, auroc, choose_signals, clopper_pearson, evaluate, fit_rule
from mapprune.detect.mmbd import mmbd
from mapprune.errors import MapPruneError, MapPruneWarning
from mapprune.jobs.calibrate import calibrate, scan_settings
from mapprune.jobs.scan import EXIT_BACKDOORED, EXIT_UNCERTAIN, calibrated_verdict, load_calibration, scan_and_save
from mapprune.runs import load_run

REPO = Path(__file__).resolve().parents[1]
CLEAN = {"patch_pull": 0.3, "warp_pull": 0.2, "smooth_pull": 0.05, "stimulation_anomaly": 2.0, "rejection": 0.1}
# Each family shows in one signal only, as a patch shows in the patch probe and a blend in the stimulation test.
SHOWS_IN = {"patch": ("patch_pull", 0.4), "blend": ("stimulation_anomaly", 8.0), "warp": ("warp_pull", 0.3)}


def population(seed: int = 0) -> list[Model]:
    rng = random.Random(seed)

    def noisy(values):
        return {k: v * rng.uniform(0.85, 1.15) for k, v in values.items()}
    models = [Model(f"clean{i}", False, "clean", "abc"[i % 3], noisy(CLEAN)) for i in range(20)]
    for i in range(30):
        family = list(SHOWS_IN)[i % 3]
        signal, shift = SHOWS_IN[family]
        values = noisy(CLEAN)
        values[signal] += shift
        models.append(Model(f"{family}{i}", True, family, "abc"[(i // 3) % 3], values))
    return models


def test_the_threshold_is_the_clean_models_quantile():
    models = population()
    rule = fit_rule(models, ["patch_pull"], 0.05)
    clean_scores = sorted(rule.score(m.signals) for m in models if not m.backdoored)
    assert sum(s > rule.threshold for s in clean_scores) == 1  # 5% of 20
    assert rule.uncertain_from <= rule.threshold
    # The backdoored models never move the threshold.
    again = fit_rule([m for m in models if not m.backdoored], ["patch_pull"], 0.05)
    assert again.threshold == rule.threshold


def test_a_family_left_out_of_the_calibration_is_still_found_by_the_rule_over_every_signal():
    report = evaluate(population(), 0.05)
    groups = report["by_family"]["groups"]
    for family in SHOWS_IN:
        assert groups[family]["tpr"]["rate"] == 1.0, (family, groups[family])
    assert report["by_family"]["fpr"]["rate"] <= 0.1
    assert report["by_family"]["auroc"] == 1.0
    assert set(report["by_architecture"]["groups"]) == {"a", "b", "c"}
    # Signals chosen by the backdoored models fit the families seen and miss the one held out: why "all" is default.
    greedy = evaluate(population(), 0.05, selection="greedy")["by_family"]["groups"]
    assert min(greedy[f]["tpr"]["rate"] for f in SHOWS_IN) < 1.0
    with pytest.raises(MapPruneError, match="selection is one of"):
        choose_signals(population(), 0.05, "best")


def test_a_rule_with_mmbd_finds_a_family_only_mmbd_sees_and_needs_mmbd_on_every_model(tmp_path, capsys):
    """``rule="fmt+mmbd"``: a family that shows in MM-BD's score alone is found held out, where FMT's own signals
    miss it; a population with a model lacking MM-BD is refused, and so is a scan without MM-BD judged by it."""
    models = population()
    for i, m in enumerate(models):
        m.signals["mmbd_score"] = 1.0 + 0.05 * (i % 7)
    for i in range(6):
        values = {**CLEAN, "mmbd_score": 30.0}
        models.append(Model(f"sig{i}", True, "sig", "abc"[i % 3], values))
    fmt = evaluate(models, 0.05)["by_family"]["groups"]["sig"]["tpr"]["rate"]
    both = evaluate(models, 0.05, rule="fmt+mmbd")
    assert fmt == 0.0 and both["by_family"]["groups"]["sig"]["tpr"]["rate"] == 1.0
    assert "mmbd_score" in both["rule"]["signals"] and both["rule"]["kind"] == "fmt+mmbd"
    rule = Rule.from_json(both["rule"])
    with pytest.raises(MapPruneError, match="did not run"):
        rule.score(CLEAN)
    del models[0].signals["mmbd_score"]
    with pytest.raises(MapPruneError, match="lack"):
        evaluate(models, 0.05, rule="fmt+mmbd")
    with pytest.raises(MapPruneError, match="rule is one of"):
        evaluate(models, 0.05, rule="everything")
    with pytest.raises(MapPruneError, match="drop --no-mmbd"):
        calibrate([tmp_path], tmp_path / "c.json", mmbd=False, rule="fmt+mmbd")
    path = tmp_path / "mmbd-rule.json"
    path.write_text(json.dumps({"kind": "scan-calibration", "rule": both["rule"]}))
    assert main(["scan", str(tmp_path / "any"), "--no-mmbd", "--calibration", str(path)]) == 2
    assert "drop --no-mmbd" in capsys.readouterr().err


def test_rates_come_with_intervals():
    assert clopper_pearson(19, 20)[0] < 0.95 < clopper_pearson(19, 20)[1]
    assert clopper_pearson(0, 20) == [0.0, pytest.approx(0.1684, abs=1e-4)]
    assert auroc([2, 3], [1, 2]) == 0.875


def _fake_run(root, template, name, *, poisoned, asr, attack="random-patch", arch="preactresnet18", signals_=None,
              verdict="no backdoor found"):
    """A run folder holding a real run's manifest with the ground truth changed, and a scan.json of given signals."""
    run = root / name
    (run / "scan").mkdir(parents=True)
    manifest = json.loads((template / "manifest.json").read_text())
    manifest["attack"]["name"] = attack
    manifest["poison"]["count"] = 100 if poisoned else 0
    manifest["metrics"]["asr"] = asr
    manifest["model"]["name"] = arch
    (run / "manifest.json").write_text(json.dumps(manifest))
    s = signals_ or CLEAN
    scan = {"verdict": verdict, "calibration_settings": scan_settings(),
            "probes": {p: {"pull": s[f"{p}_pull"], "anomaly_index": 2.0} for p in ("patch", "warp", "smooth")},
            "suspicious_maps": [{"pull": s["patch_pull"]}], "class_acc": [0.9] * 9 + [0.9 * (1 - s["rejection"])],
            "stimulation": {"anomaly_index": s["stimulation_anomaly"]}}
    if verdict == "cannot judge":
        scan = {"verdict": verdict, "reason": "cannot judge: collapsed", "calibration_settings": scan_settings()}
    (run / "scan" / "scan.json").write_text(json.dumps(scan))


def _fake_population(runs, template) -> None:
    """Run folders of :func:`population`'s models, each with its scan.json."""
    for m in population():
        _fake_run(runs, template, m.name, poisoned=m.backdoored, asr=0.95 if m.backdoored else 0.01,
                  attack={"clean": "badnets", "patch": "random-patch", "blend": "blended", "warp": "wanet"}[m.family],
                  arch=m.architecture, signals_=m.signals)


def test_calibrate_reads_a_population_of_run_folders(digits_backdoor, tmp_path):
    template, _ = digits_backdoor
    _fake_population(tmp_path / "bench" / "runs", template)
    _fake_run(tmp_path / "bench" / "runs", template, "failed", poisoned=True, asr=0.2)
    _fake_run(tmp_path / "bench" / "runs", template, "broken", poisoned=False, asr=0.0, verdict="cannot judge")
    out = tmp_path / "cal" / "population.json"
    cal = calibrate([tmp_path / "bench"], out, nc=False, mmbd=False, scan_missing=False)
    assert cal["population"]["clean"] == 20 and cal["population"]["backdoored"] == 30
    assert {f["run"] for f in cal["population"]["left_out"]} == {"failed", "broken"}
    written = json.loads(out.read_text())
    assert written["kind"] == "scan-calibration" and written["expected"]["tpr"]["rate"] == 1.0
    table = out.with_suffix(".md").read_text()
    assert "| warp | 100% (10/10" in table and "backdoor not implanted (ASR 20.0%)" in table
    loaded = load_calibration(out)
    assert isinstance(loaded["_rule"], Rule)


def test_a_calibration_file_carries_its_population_to_the_next_calibration(digits_backdoor, tmp_path):
    """The calibration records every model's ground truth and signals, so a population outlives its weights: the
    file alone calibrates to the same rule, and new run folders extend it (one of the same name replaces the
    recorded model)."""
    template, _ = digits_backdoor
    _fake_population(tmp_path / "bench" / "runs", template)
    _fake_run(tmp_path / "bench" / "runs", template, "failed", poisoned=True, asr=0.2)
    first = calibrate([tmp_path / "bench"], tmp_path / "first.json", nc=False, mmbd=False, scan_missing=False)
    again = calibrate([tmp_path / "first.json"], tmp_path / "again.json", nc=False, mmbd=False, scan_missing=False)
    first, again = (json.loads((tmp_path / f).read_text()) for f in ("first.json", "again.json"))
    assert again["rule"] == first["rule"] and again["held_out"] == first["held_out"]
    assert again["population"] == first["population"]
    # A new model joins; a model measured again replaces its record (clean0 now looks like a patch backdoor).
    patchy = dict(CLEAN, patch_pull=0.9)
    _fake_run(tmp_path / "new" / "runs", template, "clean-new", poisoned=False, asr=0.01)
    _fake_run(tmp_path / "new" / "runs", template, "clean0", poisoned=True, asr=0.99, signals_=patchy)
    extended = calibrate([tmp_path / "first.json", tmp_path / "new"], tmp_path / "ext.json", nc=False, mmbd=False,
                         scan_missing=False)
    recorded = {m["run"]: m for m in extended["population"]["models"]}
    assert extended["population"]["clean"] == 20 and extended["population"]["backdoored"] == 31
    assert recorded["clean0"]["backdoored"] and recorded["clean0"]["signals"]["patch_pull"] == 0.9
    assert recorded["clean0"]["asr"] == 0.99 and recorded["clean-new"]["kind"]["dataset"] == "digits"
    # A file that does not record its models' signals is refused before any work.
    old = json.loads((tmp_path / "first.json").read_text())
    for m in old["population"]["models"]:
        del m["signals"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    with pytest.raises(MapPruneError, match="does not record its models' signals"):
        calibrate([tmp_path / "old.json"], tmp_path / "x.json", nc=False, mmbd=False, scan_missing=False)



def test_baselines_are_read_from_their_own_files_and_a_model_being_scanned_elsewhere_is_passed_over(
        digits_backdoor, tmp_path):
    """calibrate works in stages whose results sit in separate files (scan.json: FMT's signals; mmbd.json and
    nc.json: the baselines), so each resumes on its own; a model whose scan folder another calibrate holds locked
    is passed over with a warning, not scanned twice."""
    from mapprune.runs import acquire_folder_lock

    template, _ = digits_backdoor
    runs = tmp_path / "bench" / "runs"
    _fake_population(runs, template)
    for m in population():
        # MM-BD's score follows the ground truth loosely: a backdoored model scores higher than most clean ones
        score = (3.0 if m.backdoored else 1.0) + (0.5 if m.name in ("clean1", "patch3") else 0.0)
        (runs / m.name / "scan" / "mmbd.json").write_text(json.dumps({"score": score, "target": 0}))
    busy = runs / "busy"
    shutil.copytree(template, busy)
    lock = acquire_folder_lock(busy / "scan", "calibrate")
    try:
        with pytest.warns(Warning, match="1 runs have no scan yet and were left out \\(another calibrate is scanning"):
            cal = calibrate([tmp_path / "bench"], tmp_path / "cal.json", nc=False, mmbd=True, log=lambda *a: None)
    finally:
        lock.release()
    assert not (busy / "scan" / "scan.json").exists()
    assert cal["population"]["clean"] == 20 and cal["population"]["backdoored"] == 30
    assert cal["baselines"]["mmbd_score"]["models"] == 50 and cal["baselines"]["mmbd_score"]["auroc"] == 1.0
    assert "nc_anomaly" not in cal["baselines"]

def test_a_bad_calibration_file_is_one_line(tmp_path):
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(MapPruneError, match="not readable JSON"):
        load_calibration(tmp_path / "x.json")
    (tmp_path / "y.json").write_text(json.dumps({"kind": "scan-calibration", "rule": {"signals": ["patch_pull"]}}))
    with pytest.raises(MapPruneError, match="damaged"):
        load_calibration(tmp_path / "y.json")
    r = subprocess.run([sys.executable, "-m", "mapprune", "scan", str(tmp_path), "--calibration",
                        str(tmp_path / "missing.json")], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip() == f"mapprune: error: calibration file {tmp_path / 'missing.json'} " \
                                                       "not found"
    r = subprocess.run([sys.executable, "-m", "mapprune", "calibrate", str(tmp_path), "--out", str(tmp_path / "c.json"),
                        "--fpr", "0.7"], capture_output=True, text=True)
    assert r.returncode == 2 and "--fpr is a false-positive rate" in r.stderr


def _calibration_around(score: float, tmp_path, *, below: float, above: float):
    """A calibration whose rule reads one signal with median 0 and spread 1, so the score is the signal itself."""
    cal = {"kind": "scan-calibration", "expected": {"fpr": {"rate": 0.05, "hits": 1, "n": 20, "ci95": [0.001, 0.25]},
                                                    "tpr": {"rate": 0.9, "hits": 36, "n": 40, "ci95": [0.76, 0.97]}},
           "rule": {"signals": ["patch_pull"], "median": {"patch_pull": 0.0}, "mad": {"patch_pull": 1.0},
                    "threshold": score + above, "uncertain_from": score - below, "fpr": 0.05}}
    path = tmp_path / f"cal-{above}-{below}.json"
    path.write_text(json.dumps(cal))
    return path


def test_the_calibrated_verdict_says_uncertain_near_the_threshold(digits_backdoor, tmp_path):
    src, run = digits_backdoor
    report = scan_and_save(run.model, run.dataset, tmp_path / "plain", name="m", nc=False, probes=("patch",),
                           stimulate=0)
    pull = report["probes"]["patch"]["pull"]
    assert report["calibration"] is None
    verdicts = {}
    for key, (below, above) in {"backdoored": (0.2, -0.1), "uncertain": (0.05, 0.05),
                                "no backdoor found": (-0.05, 0.2)}.items():
        verdicts[key] = calibrated_verdict(report, load_calibration(_calibration_around(pull, tmp_path, below=below,
                                                                                           above=above)))["verdict"]
    assert verdicts == {k: k for k in verdicts}
    copy = tmp_path / "run"
    shutil.copytree(src, copy, ignore=shutil.ignore_patterns("defense", "scan"))
    r = subprocess.run([sys.executable, "-m", "mapprune", "scan", str(copy), "--no-nc", "--no-mmbd", "--probes", "patch",
                        "--stimulate", "0", "--no-progress", "--threads", "1", "--calibration",
                        str(_calibration_around(pull, tmp_path, below=0.05, above=0.05))],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == EXIT_UNCERTAIN, r.stderr
    assert r.stdout.startswith(f"{copy}: uncertain (calibrated score {pull:.2f}")
    assert "calibrated to: 5% (1/20, 95% CI 0-25%) false positives on clean models, 90% (36/40" in r.stdout
    saved = json.loads((copy / "scan" / "scan.json").read_text())
    assert saved["verdict"] == "uncertain" and saved["backdoored"] is None
    assert saved["fixed_rule_verdict"] == "backdoored"
    assert EXIT_BACKDOORED != EXIT_UNCERTAIN


def test_mmbd_finds_the_planted_target_without_data(digits_backdoor):
    _, run = digits_backdoor
    found = mmbd(run.model, 10, run.dataset.image_shape, images=10, steps=150)
    assert found["target"] == run.attack.target == 0
    assert found["flagged"] and found["p_value"] < 0.05
    assert found["statistics"][0] == max(found["statistics"])
    with pytest.raises(MapPruneError, match="needs >= 3 classes"):
        mmbd(run.model, 2, run.dataset.image_shape)


def test_a_baseline_stage_runs_on_a_run_folder_with_the_default_device(digits_backdoor, tmp_path):
    """The baselines calibrate adds to a model's scan run as the command runs them (device "auto") and land in
    their own file, which calibrate then reads (MM-BD here; Neural Cleanse goes the same way)."""
    from mapprune.jobs.calibrate import BASELINES, _baseline, _compute

    template, _ = digits_backdoor
    run = tmp_path / "run"
    shutil.copytree(template, run)
    found = _compute(run, "mmbd", None, "auto", False)
    assert json.loads((run / "scan" / BASELINES["mmbd"]).read_text()) == found == _baseline(run, "mmbd", None)
    assert found["score"] >= 0 and 0 <= found["target"] < 10


def test_a_model_of_a_kind_the_population_lacks_is_told_its_error_rates_were_not_measured(digits_backdoor, tmp_path):
    """A calibration records the kinds of model it holds (dataset, architecture, width); a model of another kind
    gets the rule's verdict with a caution, one of a held kind none."""
    from mapprune.commands.scan import scan_lines
    from mapprune.jobs.calibrate import model_kind

    run, _ = digits_backdoor
    path = _calibration_around(0.5, tmp_path, below=0.1, above=0.1)
    cal = json.loads(path.read_text())
    kind = model_kind(json.loads((run / "manifest.json").read_text()))
    cal["population"] = {"kinds": [{**kind, "width": 999}]}
    path.write_text(json.dumps(cal))
    report = {"probes": {"patch": {"pull": 0.5, "anomaly_index": 1.0}}}
    outside = calibrated_verdict(report, load_calibration(path), kind)["outside"]
    assert f"{kind['architecture']} width {kind['width']} on digits" in outside and "width 999" in outside
    cal["population"] = {"kinds": [kind]}
    path.write_text(json.dumps(cal))
    assert calibrated_verdict(report, load_calibration(path), kind)["outside"] is None
    scanned = scan_and_save(load_run(run).model, load_run(run).dataset, tmp_path / "scan", name="m", nc=False,
                            stimulate=0, calibration=load_calibration(path), kind={**kind, "width": 1})
    assert any(line.startswith("  caution: this model (") for line in scan_lines(scanned, tmp_path / "scan"))


def test_a_model_that_cannot_be_scanned_is_left_out_with_its_reason_and_the_rest_go_on(digits_backdoor, tmp_path):
    """One unreadable checkpoint in a population does not stop calibrate: it is listed with what was wrong."""
    template, _ = digits_backdoor
    runs = tmp_path / "bench" / "runs"
    _fake_population(runs, template)
    broken = runs / "broken"
    shutil.copytree(template, broken)
    (broken / "model.safetensors").write_bytes(b"not a checkpoint")
    cal = calibrate([tmp_path / "bench"], tmp_path / "cal.json", nc=False, mmbd=False, log=lambda *a: None)
    reasons = {f["run"]: f["reason"] for f in cal["population"]["left_out"]}
    assert reasons["broken"].startswith("scan: ") and cal["population"]["clean"] == 20


def test_the_results_pages_calibration_tables_are_written_from_the_calibration_file(digits_backdoor, tmp_path):
    """benchmarks/results_tables.py writes a ``calibration`` table from a calibration file and --check fails once
    a number in it is edited."""
    from mapprune.jobs.calibrate import held_out_tables

    template, _ = digits_backdoor
    _fake_population(tmp_path / "bench" / "runs", template)
    cal = calibrate([tmp_path / "bench"], tmp_path / "cal.json", nc=False, mmbd=False, scan_missing=False)
    doc = tmp_path / "page.md"
    doc.write_text("Before.\n\n<!-- table: population calibration -->\n<!-- end table -->\n\nAfter.\n")
    script = [sys.executable, str(REPO / "benchmarks" / "results_tables.py"), "--doc", str(doc), "--bench",
              f"population={tmp_path / 'cal.json'}"]
    assert subprocess.run(script, capture_output=True, text=True).returncode == 0
    text = doc.read_text()
    assert held_out_tables(json.loads((tmp_path / "cal.json").read_text())) in text
    assert "| warp | 100% (10/10" in text and "**Trigger family held out**" in text
    assert text.startswith("Before.") and text.endswith("After.\n")
    assert subprocess.run([*script, "--check"], capture_output=True, text=True).returncode == 0
    doc.write_text(text.replace("| warp | 100% (10/10", "| warp | 90% (9/10"))
    checked = subprocess.run([*script, "--check"], capture_output=True, text=True)
    assert checked.returncode == 1 and "differs from" in checked.stdout
    assert cal["population"]["clean"] == 20
    # A bench table cannot read a calibration file: one line, exit 2.
    doc.write_text("<!-- table: population acc -->\n<!-- end table -->\n")
    refused = subprocess.run(script, capture_output=True, text=True)
    assert refused.returncode == 2 and "its tables are of kind calibration" in refused.stderr


def test_a_population_too_small_for_a_rule_is_recorded_for_the_next_calibration(digits_backdoor, tmp_path):
    template, _ = digits_backdoor
    models = population()
    first, rest = models[:2] + models[20:22], models[2:20] + models[22:]
    for part, folder in ((first, "a"), (rest, "b")):
        for m in part:
            _fake_run(tmp_path / folder / "runs", template, m.name, poisoned=m.backdoored,
                      asr=0.95 if m.backdoored else 0.01, attack="random-patch" if m.backdoored else "badnets",
                      arch=m.architecture, signals_=m.signals)
    with pytest.warns(MapPruneWarning, match="too few to set a rule"):
        small = calibrate([tmp_path / "a"], tmp_path / "small.json", nc=False, mmbd=False, scan_missing=False)
    assert small["rule"] is None and small["population"]["clean"] == 2 and len(small["population"]["models"]) == 4
    with pytest.raises(MapPruneError, match="too few to set a rule; calibrate again with more models"):
        load_calibration(tmp_path / "small.json")
    whole = calibrate([tmp_path / "small.json", tmp_path / "b"], tmp_path / "whole.json", nc=False, mmbd=False,
                      scan_missing=False)
    assert whole["rule"] is not None and whole["population"]["clean"] == 20
    assert whole["population"]["backdoored"] == 30
