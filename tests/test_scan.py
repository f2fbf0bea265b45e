"""mapprune scan: a verdict on a model from FMT's testing phase (and Neural Cleanse's second opinion), from a run
folder or a bare safetensors checkpoint, with the exit status scripts gate on."""

import json

import pytest
import torch

from mapprune.errors import MapPruneError


class Rejects(torch.nn.Module):
    """A model, except that class 3 is never predicted (what a clean-label attack that consumed its target leaves)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        z = self.net(x).clone()
        z[:, 3] = z[:, 3] - 100
        return z


@pytest.fixture(scope="module")
def digits_clean(tmp_path_factory):
    from mapprune.jobs.attack import attack_run

    out = tmp_path_factory.mktemp("digits") / "clean"
    attack_run("badnets", out, dataset="digits", preset="demo", progress=False, poison_ratio=0.0)
    return out


def test_scan_tells_the_backdoored_model_from_the_clean_one(digits_backdoor, digits_clean, capsys):
    from mapprune.cli import main

    folder, _ = digits_backdoor
    assert main(["scan", str(folder), "--no-nc", "--no-progress", "--out", str(folder.parent / "s1")]) == 3
    assert "backdoored" in capsys.readouterr().out
    report = json.loads((folder.parent / "s1" / "scan.json").read_text())
    assert report["suspected_target"] == 0 and report["score"] > 0.5 and report["suspicious_maps"]
    assert (folder.parent / "s1" / "scan.png").is_file()
    assert main(["scan", str(digits_clean), "--no-nc", "--no-progress", "--json"]) == 0
    clean = json.loads(capsys.readouterr().out)
    assert clean["verdict"] == "no backdoor found" and clean["score"] < 0.5
    assert set(clean["probes"]) == {"patch", "warp", "smooth"}  # one shared pass of the three probes
    assert all(p["pull"] < 0.5 for p in clean["probes"].values())
    assert report["probe"] == "patch" and report["probes"]["patch"]["suspected_target"] == 0  # a patch trigger
    assert (digits_clean / "scan" / "scan.json").is_file()
    assert clean["rejected_classes"] == [] and min(clean["class_acc"]) > 0.5


def test_a_class_the_model_never_predicts_is_flagged(digits_clean):
    """A clean-label attack that poisoned its whole target class leaves a model that never predicts that class
    without the trigger: no probe pulls there, but the scan flags the class from its clean accuracy alone."""
    from mapprune.data import clean_subset
    from mapprune.detect.scan import rejected_classes, scan
    from mapprune.runs import load_run

    run = load_run(digits_clean)

    idx = clean_subset(run.dataset.y_train, 0.3, 0)
    x, y = run.dataset.x_train[idx], run.dataset.y_train[idx]
    plain = scan(run.model, x, y, nc=False, probes=("patch",))
    assert not plain.backdoored and plain.rejected == []
    rejected = scan(Rejects(run.model), x, y, nc=False, probes=("patch",))
    assert rejected.backdoored and rejected.rejected == [3] and rejected.target == 3
    assert rejected.class_acc[3] == 0 and rejected.score < 0.5  # the probe alone would have missed it
    assert rejected_classes([0.9, None, 0.2, 0.8]) == [2] and rejected_classes([None, 0.1]) == []


def test_scan_api_with_neural_cleanse_on_any_module(digits_backdoor):
    from mapprune.data import clean_subset
    from mapprune.detect.scan import scan

    _, run = digits_backdoor
    idx = clean_subset(run.dataset.y_train, 0.3, 0)
    result = scan(run.model, run.dataset.x_train[idx], run.dataset.y_train[idx],
                  nc_options={"reverse_epochs": 3, "n_images": 100, "hflip": False})
    assert result.backdoored and result.target == 0 and len(result.suspicious_maps) == 10
    assert set(result.nc) >= {"anomaly_index", "flagged", "norms"} and len(result.nc["norms"]) == 10
    assert set(result.timings) == {"fmt_probe", "stimulate", "neural_cleanse"}
    with pytest.raises(MapPruneError, match="threshold"):
        scan(run.model, run.dataset.x_train[idx], run.dataset.y_train[idx], threshold=2.0)
    with pytest.raises(MapPruneError, match="no option"):
        scan(run.model, run.dataset.x_train[idx], run.dataset.y_train[idx], nc_options={"bogus": 1})


def test_scan_reads_a_bare_checkpoint_and_never_a_pickle(digits_backdoor, tmp_path, capsys):
    from safetensors.torch import save_file

    from mapprune.cli import main

    _, run = digits_backdoor
    bare = {k[4:]: v.contiguous() for k, v in run.model.state_dict().items() if k.startswith("net.")}
    save_file(bare, str(tmp_path / "model.safetensors"))  # a network without mapprune's wrapper
    argv = ["scan", str(tmp_path / "model.safetensors"), "--dataset", "digits", "--no-nc", "--no-progress"]
    assert main(argv + ["--arch", "smallcnn", "--num-classes", "10"]) == 3
    assert (tmp_path / "scan-model" / "scan.json").is_file()
    assert main(argv) == 2 and "--arch" in capsys.readouterr().err
    torch.save(bare, tmp_path / "model.pt")
    assert main(["scan", str(tmp_path / "model.pt"), "--arch", "smallcnn", "--num-classes", "10"]) == 2
    assert "never unpickles" in capsys.readouterr().err


def test_the_shared_fine_tune_relearns_a_rejected_class_at_relearn_lr(digits_clean):
    """``relearn_lr``: the shared fine-tune reads the incoming model's accuracy per class on the clean subset (the
    scan's rejected-class sign) and uses the larger learning rate only when a class is rejected; recorded."""
    from mapprune.data import clean_subset
    from mapprune.defenses import create_defense
    from mapprune.runs import load_run

    run = load_run(digits_clean)

    idx = clean_subset(run.dataset.y_train, 0.3, 0)
    x, y = run.dataset.x_train[idx], run.dataset.y_train[idx]
    ft = create_defense("ft", epochs=1, batch_size=64, lr=0.001, relearn_lr=0.05, progress=False)
    rejecting = ft.repair(Rejects(run.model), x, y)
    assert rejecting.extra["fine_tune"]["lr"] == 0.05 and rejecting.extra["fine_tune"]["rejected_classes"] == [3]
    plain = ft.repair(run.model, x, y)
    assert plain.extra["fine_tune"]["lr"] == 0.001 and plain.extra["fine_tune"]["rejected_classes"] == []
    assert plain.history[0]["lr"] < 0.001 < rejecting.history[0]["lr"]  # the schedule ran from the chosen peak
    assert "fine_tune" not in create_defense("ft", epochs=1, relearn_lr=0, progress=False).repair(run.model, x, y).extra
    assert create_defense("ft").relearn_lr == 0.02 and create_defense("ft", recipe="paper").relearn_lr == 0
    with pytest.raises(MapPruneError, match="relearn_lr"):
        create_defense("ft", relearn_lr=-0.1)


def test_the_stimulation_test_is_a_third_sign(digits_clean, monkeypatch):
    """The scan reports the stimulation test; its anomaly over the threshold alone makes the verdict "backdoored"
    and names its class (shown with the threshold lowered under a clean model's anomaly); level 0 skips it."""
    import mapprune.detect.scan as scan_job
    import mapprune.probes.signs as signs
    from mapprune.data import clean_subset
    from mapprune.runs import load_run

    run = load_run(digits_clean)
    idx = clean_subset(run.dataset.y_train, 0.3, 0)
    x, y = run.dataset.x_train[idx], run.dataset.y_train[idx]
    plain = scan_job.scan(run.model, x, y, nc=False, probes=("patch",))
    st = plain.stimulation
    assert not plain.backdoored and st["level"] == 4.0 and st["anomaly_index"] < signs.ANOMALY_THRESHOLD
    assert plain.to_json()["stimulation"] == st and "stimulate" in plain.timings
    monkeypatch.setattr(signs, "ANOMALY_THRESHOLD", st["anomaly_index"] - 0.01)
    flagged = scan_job.scan(run.model, x, y, nc=False, probes=("patch",))
    assert flagged.backdoored and flagged.target == st["target"] and flagged.score < 0.5 and not flagged.rejected
    assert scan_job.scan(run.model, x, y, nc=False, probes=("patch",), stimulate=0).stimulation is None
