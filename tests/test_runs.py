"""End to end: a real (small) backdoor attack, the run folder, the CLI's errors, and resuming training."""

import json
import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from mapprune import cli
from mapprune.checkpoint import save_model
from mapprune.data import load_dataset
from mapprune.errors import MapPruneError
from mapprune.evaluation import evaluate_run
from mapprune.jobs import attack as backdoor
from mapprune.jobs.attack import attack_run
from mapprune.models import create_model
from mapprune.train import TrainConfig, train

DEMO = ["--dataset", "digits", "--preset", "demo", "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One BadNets run on the embedded digits (the demo preset: 12 epochs of a small CNN), shared by the module."""
    out = tmp_path_factory.mktemp("runs") / "badnets"
    manifest = attack_run("badnets", out, dataset="digits", preset="demo", device="cpu", progress=False)
    return out, manifest


@pytest.fixture
def run_copy(run, tmp_path):
    """A private copy of the run, for tests that damage it."""
    dst = tmp_path / "run"
    shutil.copytree(run[0], dst)
    return dst


def cli_error(capsys, argv) -> str:
    """Runs the CLI expecting a clean failure: non-zero status and one line on stderr, no traceback."""
    rc = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert rc != 0, captured
    err = captured.err.strip()
    assert err.startswith("mapprune: error: "), err
    assert "\n" not in err and "Traceback" not in err, err
    return err


# -- the attack works and its run folder is complete -----------------------------------------------------------
def test_attack_plants_a_backdoor(run):
    _, m = run
    assert m["metrics"]["acc"] > 0.9, m["metrics"]
    assert m["metrics"]["asr"] > 0.9, m["metrics"]
    assert 0 <= m["metrics"]["ra"] and m["metrics"]["ra"] + m["metrics"]["asr"] <= 1 + 1e-12  # one class each
    correct = m["metrics"]["acc"] * m["dataset"]["test"]
    assert correct == pytest.approx(round(correct), abs=1e-9)  # an exact fraction of the test images


def test_run_folder_contents(run):
    out, _ = run
    assert {p.name for p in out.iterdir()} == {"manifest.json", "model.safetensors", "attack.safetensors",
                                               "samples.png"}
    assert not out.with_name(out.name + ".partial").exists()
    with Image.open(out / "samples.png") as im:
        assert im.format == "PNG" and im.size[0] > 100
    attack = load_file(str(out / "attack.safetensors"))
    assert attack["poison_indices"].dtype == torch.int64


def test_manifest(run):
    out, m = run
    assert json.loads((out / "manifest.json").read_text()) == json.loads(json.dumps(m))
    ds = load_dataset("digits")
    assert m["kind"] == "attack" and m["seed"] == 0 and m["preset"] == "demo"
    assert m["model"]["name"] == "smallcnn" and m["model"]["width"] == 32 and m["model"]["num_classes"] == 10
    assert m["train"]["epochs"] == 12 and m["train"]["lr"] == 0.05 and m["train"]["seed"] == 0
    assert m["attack"] == {"name": "badnets", "target": 0, "all_to_all": False, "poison_ratio": 0.1,
                           "clean_label": False, "patch_size": 1}
    assert m["dataset"]["fingerprint"] == ds.fingerprint() and m["dataset"]["train"] == len(ds.y_train)
    assert m["poison"]["count"] == round(0.1 * len(ds.y_train))
    assert {"mapprune", "python", "torch", "numpy"} <= set(m["versions"])
    assert m["versions"]["torch_threads"] == torch.get_num_threads()  # CPU results depend on it in the last digits
    assert m["timings"]["train_s"] > 0 and m["timings"]["total_s"] >= m["timings"]["train_s"]
    assert m["peak_memory_mb"] > 0
    assert set(m["metrics"]) == {"acc", "asr", "ra"}
    assert [h["epoch"] for h in m["history"]] == list(range(1, 13))
    assert m["history"][-1]["acc"] == m["metrics"]["acc"]


def test_evaluate_run_reproduces_the_manifest(run):
    out, m = run
    r = evaluate_run(out, device="cpu")
    n_backdoor = m["dataset"]["test"] - 1  # bound: at most one image may flip between evaluations
    for k in ("acc", "asr", "ra"):
        assert r[k] == pytest.approx(m["metrics"][k], abs=1 / n_backdoor), k


def test_cli_eval_json(run, capsys):
    out, m = run
    assert cli.main(["eval", str(out), "--json", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert captured.out.count("\n") == 1
    result = json.loads(captured.out)
    assert isinstance(result, dict)
    for k in ("acc", "asr", "ra"):
        assert 0 <= result[k] <= 1
    assert result["asr"] == pytest.approx(m["metrics"]["asr"], abs=0.005)


def test_cli_eval_text(run, capsys):
    assert cli.main(["eval", str(run[0]), "--device", "cpu"]) == 0
    line = capsys.readouterr().out.strip()
    assert "ACC" in line and "ASR" in line and "RA" in line and "%" in line


# -- bad input through the CLI --------------------------------------------------------------------------------
@pytest.mark.parametrize(("argv", "expected"), [
    (["attack", "badnets", "--dataset", "mnist"], "unknown dataset 'mnist'; valid datasets: cifar10, cifar100, digits"),
    (["attack", "nope", "--dataset", "digits"],
     "unknown attack 'nope'; valid attacks: adap-blend, adap-patch, badnets, blended, bpp, bypass, "),
    (["attack", "badnets", "--dataset", "digits", "--model", "resnet50"],
     "unknown model 'resnet50'; valid models: preactresnet18, preactresnet18-bb, resnet18, resnet18-bb, "),
    (["attack", "badnets", "--dataset", "digits", "--preset", "fast"], "unknown preset 'fast'; valid presets: cpu"),
    (["attack", "badnets", "--dataset", "digits", "--preset", "demo", "--target", "10"],
     r"target label must be in [0, 9]"),
    (["attack", "badnets", "--dataset", "digits", "--preset", "demo", "--width", "0"], "width must be a positive"),
    (["attack", "badnets", "--dataset", "digits", "--preset", "demo", "--epochs", "-1"], "epochs must be >= 0"),
    (["attack", "badnets", "--dataset", "digits", "--preset", "demo", "--eval-every", "0"], "--eval-every must be"),
])
def test_cli_rejects_bad_names_and_values(capsys, tmp_path, argv, expected):
    out = tmp_path / "out"
    err = cli_error(capsys, [*argv, "--out", out, "--no-progress", "--device", "cpu"])
    assert expected in err
    # nothing is left behind that would later look like an interrupted run
    assert not out.exists() and not out.with_name("out.partial").exists()


def test_cli_missing_data_folder(capsys, tmp_path):
    missing = tmp_path / "no-such-folder"
    err = cli_error(capsys, ["attack", "badnets", "--dataset", "cifar10", "--data-dir", missing, "--out",
                             tmp_path / "out", "--no-progress"])
    assert str(missing) in err and "python-pickle layout" in err and "ImageFolder" in err
    assert not (tmp_path / "out.partial").exists()


@pytest.mark.parametrize("ratio", ["1.5", "-0.1", "ten"])
def test_cli_poison_ratio_out_of_range(capsys, tmp_path, ratio):
    with pytest.raises(SystemExit) as e:
        cli.main(["attack", "badnets", *DEMO, "--poison-ratio", ratio, "--out", str(tmp_path / "o")])
    assert e.value.code == 2
    assert "--poison-ratio" in capsys.readouterr().err
    assert not (tmp_path / "o.partial").exists()


def test_cli_corrupted_checkpoint(capsys, run_copy):
    (run_copy / "model.safetensors").write_bytes(b"\x00garbage" * 100)
    err = cli_error(capsys, ["eval", run_copy])
    assert "model.safetensors is corrupted or truncated" in err


def test_cli_truncated_checkpoint(capsys, run_copy):
    path = run_copy / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    err = cli_error(capsys, ["eval", run_copy])
    assert "model.safetensors is corrupted or truncated" in err


@pytest.mark.parametrize(("width", "classes"), [(8, 10), (32, 5)])
def test_cli_checkpoint_of_another_model(capsys, run_copy, width, classes):
    save_model(create_model("smallcnn", classes, width=width, in_channels=1), run_copy / "model.safetensors")
    err = cli_error(capsys, ["eval", run_copy])
    assert "does not fit the smallcnn with 10 classes" in err and "shape mismatches" in err


def test_cli_missing_pieces(capsys, run_copy, tmp_path):
    err = cli_error(capsys, ["eval", run_copy, "--defense", "fmt"])
    assert "defense/fmt/model.safetensors does not exist" in err
    (run_copy / "attack.safetensors").unlink()
    assert "attack.safetensors does not exist" in cli_error(capsys, ["eval", run_copy])
    (run_copy / "manifest.json").write_text("{not json")
    assert "is not valid JSON" in cli_error(capsys, ["eval", run_copy])
    assert "manifest.json is missing" in cli_error(capsys, ["eval", tmp_path / "nowhere"])


def test_cli_interrupted_run_is_not_a_run(capsys, tmp_path):
    out = tmp_path / "r"
    (tmp_path / "r.partial").mkdir()
    err = cli_error(capsys, ["eval", out])
    assert "is not a mapprune run folder" in err and "interrupted run" in err


def test_cli_existing_run_needs_overwrite(capsys, run_copy):
    before = (run_copy / "model.safetensors").read_bytes()
    err = cli_error(capsys, ["attack", "badnets", *DEMO, "--epochs", "1", "--out", run_copy])
    assert "already holds a run" in err and "--overwrite" in err
    assert (run_copy / "model.safetensors").read_bytes() == before
    assert cli.main(["attack", "badnets", *DEMO, "--epochs", "1", "--overwrite", "--out", str(run_copy)]) == 0
    assert "ACC" in capsys.readouterr().out
    m = json.loads((run_copy / "manifest.json").read_text())
    assert m["train"]["epochs"] == 1 and len(m["history"]) == 1
    assert not run_copy.with_name("run.partial").exists()


def test_cli_overwrite_never_deletes_a_folder_that_is_not_a_run(capsys, tmp_path):
    precious = tmp_path / "documents"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    err = cli_error(capsys, ["attack", "badnets", *DEMO, "--epochs", "1", "--overwrite", "--out", precious])
    assert "holds no mapprune run" in err
    assert (precious / "thesis.tex").read_text() == "years of work"


def test_interrupted_attack_resumes_to_the_same_model(capsys, tmp_path, monkeypatch):
    """Ctrl-C during epoch 2, rerun the same command: the result equals an uninterrupted run's."""
    ref = attack_run("badnets", tmp_path / "ref", dataset="digits", preset="demo", epochs=3, device="cpu",
                     progress=False)
    out = tmp_path / "r"
    argv = ["attack", "badnets", *DEMO, "--epochs", "3", "--out", str(out)]
    real_evaluate, calls = backdoor.evaluate, []

    def interrupted_evaluate(model, test_sets, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # after epoch 2's training, before its checkpoint
        return real_evaluate(model, test_sets, **kw)

    monkeypatch.setattr(backdoor, "evaluate", interrupted_evaluate)
    assert cli.main(argv) == 130
    assert "interrupted" in capsys.readouterr().err
    assert not out.exists() and (tmp_path / "r.partial" / "train_checkpoint.safetensors").is_file()
    assert "interrupted run" in cli_error(capsys, ["eval", out])
    # another command must not continue this checkpoint as if it were its own
    err = cli_error(capsys, ["attack", "blended", *DEMO, "--epochs", "3", "--out", out])
    assert "other settings" in err and (tmp_path / "r.partial" / "train_checkpoint.safetensors").is_file()

    monkeypatch.setattr(backdoor, "evaluate", real_evaluate)
    assert cli.main(argv) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["metrics"] == ref["metrics"]
    assert [(h["loss"], h["train_acc"]) for h in m["history"]] == [(h["loss"], h["train_acc"]) for h in ref["history"]]
    a, b = load_file(str(out / "model.safetensors")), load_file(str(tmp_path / "ref" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "r.partial").exists()


# -- the training loop's checkpoint ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small():
    ds = load_dataset("digits")
    return ds.x_train[:320], ds.y_train[:320], ds


def make_model(ds, seed=0):
    torch.manual_seed(seed)
    return create_model("smallcnn", 10, width=8, in_channels=1, mean=ds.mean, std=ds.std)


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


CFG = dict(batch_size=64, lr=0.05, schedule="onecycle", nesterov=True, hflip=False)


def test_finished_checkpoint_is_not_retrained(small, tmp_path):
    x, y, ds = small
    ckpt = tmp_path / "ckpt.safetensors"
    first = make_model(ds)
    h1 = train(first, x, y, TrainConfig(epochs=2, **CFG), checkpoint=ckpt, progress=False)
    assert len(h1) == 2 and ckpt.is_file()
    second = make_model(ds, seed=1)  # other initial weights: what comes out must be the checkpoint's
    assert not same_weights(first, second)
    h2 = train(second, x, y, TrainConfig(epochs=2, **CFG), checkpoint=ckpt, progress=False)
    assert h2 == h1 and len(h2) == 2
    assert same_weights(first, second)


def test_checkpoint_of_other_settings_is_refused(small, tmp_path):
    x, y, ds = small
    ckpt = tmp_path / "ckpt.safetensors"
    train(make_model(ds), x, y, TrainConfig(epochs=1, **CFG), checkpoint=ckpt, progress=False)
    with pytest.raises(MapPruneError, match="other training settings"):
        train(make_model(ds), x, y, TrainConfig(epochs=1, **{**CFG, "lr": 0.1}), checkpoint=ckpt, progress=False)
    ckpt.write_bytes(b"garbage")
    with pytest.raises(MapPruneError, match="corrupted or truncated"):
        train(make_model(ds), x, y, TrainConfig(epochs=1, **CFG), checkpoint=ckpt, progress=False)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_interrupted_training_resumes_exactly(small, tmp_path, optimizer):
    x, y, ds = small
    cfg = TrainConfig(epochs=3, **{**CFG, "optimizer": optimizer, **({"lr": 1e-3} if optimizer == "adam" else {})})
    reference = make_model(ds)
    ref_history = train(reference, x, y, cfg, progress=False)

    ckpt = tmp_path / "ckpt.safetensors"
    calls = []

    def interrupt_in_epoch_2(model):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return {}

    with pytest.raises(KeyboardInterrupt):
        train(make_model(ds), x, y, cfg, checkpoint=ckpt, eval_fn=interrupt_in_epoch_2, progress=False)
    resumed = make_model(ds, seed=5)  # a fresh process would build a fresh model
    history = train(resumed, x, y, cfg, checkpoint=ckpt, progress=False)
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert [(h["loss"], h["train_acc"], h["lr"]) for h in history] == \
        [(h["loss"], h["train_acc"], h["lr"]) for h in ref_history]
    sa, sb = resumed.state_dict(), reference.state_dict()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=1e-6, msg=k)


def test_eval_every_skips_epochs_but_never_the_last(small):
    x, y, ds = small
    evaluated = []

    def count(model):
        evaluated.append(1)
        return {"acc": 0.5}

    history = train(make_model(ds), x, y, TrainConfig(epochs=3, **CFG), eval_fn=count, eval_every=2, progress=False)
    assert len(evaluated) == 2 and ["acc" in h for h in history] == [False, True, True]
    with pytest.raises(MapPruneError, match="eval_every"):
        train(make_model(ds), x, y, TrainConfig(epochs=1, **CFG), eval_fn=count, eval_every=0, progress=False)
