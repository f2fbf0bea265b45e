"""A broken model is never measured or called clean: non-finite weights are refused naming the tensor, a collapsed
model gets the scan verdict "cannot judge" (exit 4), and every JSON file mapprune writes is strict JSON."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from mapprune.detect.scan import CannotJudge, check_judgeable, scan
from mapprune.errors import MapPruneError
from mapprune.jobs.scan import EXIT_CANNOT_JUDGE
from mapprune.runs import json_text, load_run, write_json


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "mapprune", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


def _edit_weights(run, edit) -> None:
    path = run / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"mapprune": "{}"})


@pytest.fixture
def run_copy(digits_backdoor, tmp_path):
    src, _ = digits_backdoor
    dst = tmp_path / "run"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("defense", "scan"))
    return dst


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_checkpoint_with_non_finite_weights_is_refused_naming_the_tensor(run_copy, value):
    _edit_weights(run_copy, lambda t: t["net.classifier.weight"].view(-1).__setitem__(0, value))
    with pytest.raises(MapPruneError, match=r"net\.classifier\.weight.*NaN or infinite"):
        load_run(run_copy)
    for args in (("eval", run_copy, "--json"), ("scan", run_copy, "--no-nc")):
        r = _cli(*args)
        assert r.returncode == 2, r.stderr
        assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr
        assert "non-finite" in r.stderr and "net.classifier.weight" in r.stderr
        assert r.stdout == ""
    assert not (run_copy / "scan").exists()


def test_a_collapsed_model_cannot_be_judged(run_copy):
    def collapse(t):
        bias = t["net.classifier.bias"]
        bias.zero_()
        bias[3] = 1e4
    _edit_weights(run_copy, collapse)
    r = _cli("scan", run_copy, "--no-nc", "--no-progress")
    assert r.returncode == EXIT_CANNOT_JUDGE, (r.stdout, r.stderr)
    assert "cannot judge: the model predicts class 3 for 100% of clean images" in r.stdout
    assert "no backdoor found" not in r.stdout
    report = json.loads((run_copy / "scan" / "scan.json").read_text())
    assert report["verdict"] == "cannot judge" and report["backdoored"] is None
    assert report["majority_class"] == 3 and report["majority_share"] == 1.0


def test_the_degeneracy_rule():
    y = torch.arange(10).repeat(10)
    check_judgeable(y.clone(), y, 10)  # a perfect model passes
    nearly_one = torch.full_like(y, 2)
    nearly_one[:15] = y[:15]
    with pytest.raises(CannotJudge, match="class 2 for 87%"):
        check_judgeable(nearly_one, y, 10)
    shuffled = (y + 1) % 10  # balanced predictions, every one wrong
    with pytest.raises(CannotJudge, match="near chance"):
        check_judgeable(shuffled, y, 10)


def test_scan_refuses_before_probing(digits_backdoor):
    """The check runs before FMT's probes: a constant model is refused at once, from Python too."""
    _, run = digits_backdoor

    class Constant(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            out = torch.zeros(len(x), 10) + self.w
            out[:, 7] = 1
            return out

    x, y = run.dataset.x_train[:200], run.dataset.y_train[:200]
    with pytest.raises(CannotJudge):
        scan(Constant(), x, y, nc=False, num_classes=10)


def test_json_files_are_strict(tmp_path):
    obj = {"a": float("nan"), "b": [1.0, float("inf"), {"c": -float("inf")}], "d": 0.5, "e": (1, 2)}
    write_json(tmp_path / "x.json", obj)
    text = (tmp_path / "x.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"a": None, "b": [1.0, None, {"c": None}], "d": 0.5, "e": [1, 2]}
    assert json.loads(json_text(obj, indent=None)) == json.loads(text)


def test_float_flags_refuse_nan_in_one_line(run_copy):
    r = _cli("defend", "ft", run_copy, "--lr", "nan")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "not a finite number" in r.stderr
    assert not (run_copy / "defense").exists()
