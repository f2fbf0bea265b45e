"""Damaged or wrong inputs: each is one line ("mapprune: error: ..." with exit status 2, or a warning where the work
goes on), never a traceback, and leaves nothing half-written."""

import errno
import json
import math
import pickle
import shutil
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import SafetensorError

from mapprune import checkpoint
from mapprune.cli import main
from mapprune.errors import MapPruneError, MapPruneWarning
from mapprune.options import check_options
from mapprune.runs import load_run, read_manifest

DEMO = ["--dataset", "digits", "--preset", "demo", "--device", "cpu", "--no-progress", "--threads", "1"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """One BadNets run on the embedded digits with one finished defense (ft-epochs1) inside."""
    from mapprune.jobs.attack import attack_run
    from mapprune.jobs.defend import defend_run

    out = tmp_path_factory.mktemp("bad-inputs") / "badnets"
    attack_run("badnets", out, dataset="digits", preset="demo", device="cpu", progress=False)
    defend_run(out, "ft", epochs=1, device="cpu", progress=False)
    return out


@pytest.fixture
def run(base, tmp_path):
    """A private copy of the run, for tests that damage it."""
    dst = tmp_path / "run"
    shutil.copytree(base, dst)
    return dst


def cli(*args, code: int = 2) -> subprocess.CompletedProcess:
    """``python -m mapprune ARGS`` in a fresh process, expecting exit status ``code`` and, for an error, exactly one
    line on stderr."""
    r = subprocess.run([sys.executable, "-m", "mapprune", *map(str, args)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == code, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    if code:
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("mapprune: error: "), r.stderr
    return r


def error_line(capsys, argv, code: int = 2) -> str:
    """The CLI run in this process, expecting status ``code`` and one error line on stderr."""
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert rc == code, err
    assert err.startswith("mapprune: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def _edit_manifest(run, change) -> None:
    path = run / "manifest.json"
    m = json.loads(path.read_text())
    change(m)
    path.write_text(json.dumps(m))


# -- 1. manifest.json with missing keys or keys of the wrong type ----------------------------------------------

@pytest.mark.parametrize(("change", "key"), [
    (lambda m: m.pop("model"), "'model'"),
    (lambda m: m.__setitem__("model", "preactresnet18"), "'model' is a string"),
    (lambda m: m["model"].__setitem__("num_classes", "ten"), "'model.num_classes' is a string (\"ten\")"),
    (lambda m: m["model"].__setitem__("num_classes", True), "'model.num_classes' is a boolean"),
    (lambda m: m.pop("dataset"), "'dataset'"),
    (lambda m: m["dataset"].__setitem__("image_shape", [1, "8", 8]), "'dataset.image_shape'"),
    (lambda m: m["model"].__setitem__("width", 1.5), "'model.width'"),
    (lambda m: m["attack"].pop("name"), "'attack.name'"),
])
def test_a_damaged_manifest_names_the_file_and_the_key(run, change, key):
    _edit_manifest(run, change)
    with pytest.raises(MapPruneError) as e:
        load_run(run)
    assert str(run / "manifest.json") in str(e.value) and key in str(e.value), e.value
    assert "is damaged" in str(e.value) and "re-create the run" in str(e.value)


def test_a_damaged_manifest_is_one_line_on_the_command_line(run, capsys):
    _edit_manifest(run, lambda m: m["model"].__setitem__("num_classes", "ten"))
    err = cli("eval", run).stderr
    assert "manifest.json is damaged" in err and "model.num_classes" in err
    _edit_manifest(run, lambda m: m["metrics"].pop("asr"))  # what report reads
    assert "'metrics.asr'" in error_line(capsys, ["report", run])
    with pytest.raises(MapPruneError, match="manifest.json is damaged: it has no 'metrics.asr'"):
        read_manifest(run)
    (run / "manifest.json").write_text("[1, 2]")
    assert "not the manifest object" in error_line(capsys, ["eval", run])


def test_attack_settings_the_attack_does_not_take_are_one_line(run, capsys):
    _edit_manifest(run, lambda m: m["attack"].__setitem__("colour", "red"))
    err = error_line(capsys, ["eval", run])
    assert "manifest.json is damaged" in err and "badnets" in err and "colour" in err


# -- 2. a damaged result.json in a defense folder -------------------------------------------------------------

@pytest.mark.parametrize("damage", ['{"name": "ft-epochs1", "after": {"acc": 0.9', '{"name": 3}', "[]",
                                    '{"name": "x", "after": {"acc": "high"}}'])
def test_a_damaged_result_is_one_line_for_eval_and_left_out_of_the_report(run, capsys, damage):
    from mapprune.results import collect_rows

    result = run / "defense" / "ft-epochs1" / "result.json"
    result.write_text(damage)
    err = error_line(capsys, ["eval", run, "--defense", "ft-epochs1"])
    assert str(result) in err and "--overwrite" in err
    with pytest.warns(MapPruneWarning, match="left out of the report: .*ft-epochs1/result.json"):
        rows = collect_rows([run])
    assert [r["defense"] for r in rows] == ["none"]


def test_report_of_several_runs_skips_only_the_damaged_result(run, base):
    (run / "defense" / "ft-epochs1" / "result.json").write_text('{"name": "ft-ep')
    r = cli("report", run, base, code=0)
    warning = r.stderr.strip().splitlines()
    assert len(warning) == 1 and warning[0].startswith("mapprune: warning: left out of the report: ") \
        and str(run / "defense" / "ft-epochs1" / "result.json") in warning[0], r.stderr
    rows = [line for line in r.stdout.splitlines() if line.startswith("| ") and "badnets" in line]
    assert len(rows) == 3 and sum("ft-epochs1" in line for line in rows) == 1  # both runs; the sound result


# -- 3. a decompression bomb as a trigger image ----------------------------------------------------------------

def _png_header(path, width: int, height: int) -> None:
    """A tiny PNG file that declares ``width`` x ``height`` grey pixels (its data is a few bytes)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


@pytest.mark.parametrize(("width", "height"), [(30000, 30000), (12000, 12000), (9000, 9000)])
def test_a_huge_image_is_refused_before_decoding(tmp_path, width, height):
    from mapprune.images import read_image

    bomb = tmp_path / "bomb.png"
    _png_header(bomb, width, height)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not even Pillow's DecompressionBombWarning gets out
        with pytest.raises(MapPruneError, match=r"bomb.png .*(too large|declares 9000x9000).*give a smaller image"):
            read_image(bomb, 3, what="the patch pattern")


def test_a_decompression_bomb_as_a_pattern_is_one_line(tmp_path, capsys):
    bomb = tmp_path / "bomb.png"
    _png_header(bomb, 30000, 30000)
    out = tmp_path / "run"
    err = cli("attack", "patch", "--pattern", bomb, *DEMO, "--out", out).stderr
    assert "bomb.png" in err and "smaller image" in err
    err = error_line(capsys, ["attack", "blended", "--pattern", bomb, *DEMO, "--out", out])
    assert "blend pattern" in err and "smaller image" in err
    assert not out.exists() and not out.with_name("run.partial").exists()


# -- 4. attack options of the wrong type ----------------------------------------------------------------------

def test_an_attack_option_of_the_wrong_type_is_one_line_naming_it(tmp_path):
    out = tmp_path / "run"
    err = cli("attack", "blended", "--attack-opt", "alpha=abc", *DEMO, "--out", out).stderr
    assert "alpha='abc'" in err and "a string" in err and "takes a number" in err and "alpha=0.2" in err
    assert not out.exists() and not out.with_name("run.partial").exists()


def test_check_options_follows_the_annotations():
    from mapprune.attacks import attack_class

    blended, badnets = attack_class("blended"), attack_class("badnets")
    bad = [({"alpha": "abc"}, "alpha='abc' is a string, but alpha takes a number"),
           ({"alpha": True}, "is a boolean"),
           ({"alpha": math.nan}, "not finite"), ({"alpha": math.inf}, "not finite"), ({"alpha": "nan"}, "a string"),
           ({"alpha": [0.1]}, "is a list"), ({"alpha": {"v": 1}}, "is a mapping"),
           ({"pattern_seed": 3.0}, "is a decimal number, but pattern_seed takes a whole number"),
           ({"pattern_seed": "3.5"}, "a string"), ({"all_to_all": 1}, "takes true or false"),
           ({"poison_ratio": None}, "empty"), ({"alph": 0.1}, "has no option 'alph'; valid options: .*alpha")]
    for opts, message in bad:
        with pytest.raises(MapPruneError, match=message):
            check_options(blended, opts, "blended")
    # accepted: the annotated type, an int for a float, numeric strings converted, none where optional
    assert check_options(blended, {"alpha": 1, "pattern_seed": "7", "target": "+2", "all_to_all": "false"},
                         "blended") == {"alpha": 1, "pattern_seed": 7, "target": 2, "all_to_all": False}
    assert check_options(blended, {"alpha": "0.25", "pattern_file": 123}, "blended") == \
        {"alpha": 0.25, "pattern_file": "123"}  # a name of digits the command line read as a number
    assert check_options(badnets, {"patch_size": None}, "badnets") == {"patch_size": None}
    assert check_options(badnets, {"patch_size": "none"}, "badnets") == {"patch_size": None}
    unchecked = {"pattern": torch.zeros(1, 8, 8), "position": [0, 1]}  # unannotated: passed through
    assert check_options(attack_class("patch"), unchecked, "patch") == unchecked

    def plain(*, n: int = 1, **rest):
        return n

    assert check_options(plain, {"n": "4", "other": 1.5}, "plain") == {"n": 4, "other": 1.5}


# -- 5. a damaged BackdoorBench file ----------------------------------------------------------------------------

def _bb_files(tmp_path) -> dict:
    """Damaged variants of a BackdoorBench attack_result.pt (a torch.save'd dict of tensors and arrays)."""
    content = {"model_name": "preactresnet18", "num_classes": 10, "model": {"w": torch.zeros(16, 16)},
               "clean_data": "cifar10", "bd_test": {"poison_indicator": np.ones(90, dtype=np.int64)}}
    whole, legacy = tmp_path / "whole.pt", tmp_path / "legacy.pt"
    torch.save(content, whole)
    torch.save(content, legacy, _use_new_zipfile_serialization=False)
    files = {}

    def write(name, data: bytes):
        files[name] = tmp_path / f"{name}.pt"
        files[name].write_bytes(data)

    for cut in (0.5, 0.9):
        write(f"zip-cut{cut}", whole.read_bytes()[:int(len(whole.read_bytes()) * cut)])
    for n in (1, 5, 18, 100, 300):
        write(f"legacy-cut{n}", legacy.read_bytes()[:n])
    write("pickle-of-a-string", pickle.dumps("attack_result"))
    write("pickle-of-a-string-cut", pickle.dumps("attack_result", protocol=2)[:9])
    write("text", b"hello, this is not a pickle\n")
    write("empty", b"")
    torch.save("attack_result", tmp_path / "torch-string.pt")
    files["torch-string"] = tmp_path / "torch-string.pt"
    return files


def test_a_damaged_backdoorbench_file_is_one_error(tmp_path):
    from mapprune.jobs.import_backdoorbench import read_backdoorbench

    for name, path in _bb_files(tmp_path).items():
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # torch's pickle-protocol warning stays inside
            with pytest.raises(MapPruneError) as e:
                read_backdoorbench(path)
        message = str(e.value)
        assert "\n" not in message and str(path) in message, (name, message)
        assert any(s in message for s in ("truncated, damaged", "not a BackdoorBench attack result")), (name, message)
    bad_classes = tmp_path / "classes.pt"
    torch.save({"model_name": "preactresnet18", "num_classes": "ten", "model": {"conv1.weight": torch.zeros(4, 3, 3, 3)},
                "clean_data": "cifar10", "bd_test": {}}, bad_classes)
    from mapprune.jobs.import_backdoorbench import backdoorbench_model

    with pytest.raises(MapPruneError, match="num_classes is 'ten'"):
        backdoorbench_model(read_backdoorbench(bad_classes), "cifar10")


def test_an_import_setting_of_the_wrong_type_is_refused_before_any_work(tmp_path):
    from mapprune.jobs.import_backdoorbench import import_backdoorbench

    _bb_files(tmp_path)
    with pytest.raises(MapPruneError, match="blended option alpha='abc' is a string, but alpha takes a number"):
        import_backdoorbench(tmp_path / "whole.pt", tmp_path / "run", attack="blended", attack_kw={"alpha": "abc"})
    assert not (tmp_path / "run").exists() and not (tmp_path / "run.partial").exists()


def test_a_truncated_backdoorbench_file_is_one_line_on_the_command_line(tmp_path):
    path = _bb_files(tmp_path)["legacy-cut100"]
    err = cli("import-backdoorbench", path, "--out", tmp_path / "run", "--attack", "badnet").stderr
    assert "truncated, damaged" in err
    assert not (tmp_path / "run").exists() and not (tmp_path / "run.partial").exists()


# -- 6. damaged cache entries ---------------------------------------------------------------------------------------

@pytest.fixture
def image_folder(tmp_path, monkeypatch):
    """A two-class ImageFolder of random 8x8 pictures, with its own empty cache."""
    monkeypatch.setenv("MAPPRUNE_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("test", 2)):
        for c in ("a", "b"):
            (tmp_path / "data" / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "data" / split / c /
                                                                                        f"{i}.png")
    return tmp_path / "data"


def test_a_damaged_decoded_image_cache_entry_is_rebuilt(image_folder, tmp_path):
    from mapprune.data import load_dataset

    first = load_dataset("imagefolder", image_folder)
    [entry] = (tmp_path / "cache" / "decoded").glob("*.npz")
    whole = entry.read_bytes()
    np.savez(tmp_path / "other.npz", something=np.zeros(3))
    for damage in (whole[:len(whole) // 2], whole[:40], b"garbage" * 20, b"", (tmp_path / "other.npz").read_bytes()):
        entry.write_bytes(damage)
        again = load_dataset("imagefolder", image_folder)
        assert torch.equal(again.x_train, first.x_train) and torch.equal(again.x_test, first.x_test)
        with np.load(entry) as z:  # written again, whole
            assert np.array_equal(z["x_train"], first.x_train.permute(0, 2, 3, 1).numpy())
    assert sorted(p.name for p in entry.parent.iterdir()) == [entry.name]  # no temporary file left


def test_a_damaged_resource_cache_entry_is_rebuilt(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from mapprune.resources import cached_resource, resource_path

    monkeypatch.setenv("MAPPRUNE_CACHE", str(tmp_path / "cache"))
    key, built = {"n": 1}, {"w": torch.arange(10.0)}
    cached_resource("thing", key, lambda: built)
    path = resource_path("thing", key)
    whole = path.read_bytes()
    for damage in (whole[:len(whole) // 2], b"\xff" * 50, b""):
        path.write_bytes(damage)
        with pytest.warns(MapPruneWarning, match="rebuilding the cached thing"):
            tensors, _ = cached_resource("thing", key, lambda: built)
        assert torch.equal(tensors["w"], built["w"]) and path.read_bytes() == whole
    save_file({"w": torch.zeros(2)}, str(path), metadata={"mapprune": "[1, 2]"})  # metadata that is not an object
    with pytest.warns(MapPruneWarning, match="rebuilding"):
        tensors, _ = cached_resource("thing", key, lambda: built)
    assert torch.equal(tensors["w"], built["w"])


# -- 7. defend: its messages, its --name, its default folder name, nothing left behind -----------------------------

def test_defend_messages_name_its_own_options(run, capsys):
    err = error_line(capsys, ["defend", "ft", run, "--epochs", "1", *DEMO[4:]])
    assert "already holds" in err and "--overwrite" in err and "--name NAME" in err and "--out" not in err
    (run / "defense" / "taken").mkdir()
    (run / "defense" / "taken" / "notes.txt").write_text("mine")
    err = error_line(capsys, ["defend", "ft", run, "--epochs", "1", "--name", "taken", "--overwrite", *DEMO[4:]])
    assert "holds no defense result" in err and "--out" not in err
    assert (run / "defense" / "taken" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("name", ["../../x", "a/b", "..", ".hidden", "", "x.partial", "a\\b"])
def test_defend_refuses_a_name_that_is_not_a_plain_folder(run, tmp_path, capsys, name):
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    err = error_line(capsys, ["defend", "ft", run, "--epochs", "1", "--name", name, *DEMO[4:]])
    assert "is not a plain folder name" in err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing written anywhere


def test_defend_refused_by_its_options_leaves_no_folder(run, capsys):
    before = sorted(p.name for p in (run / "defense").iterdir())
    assert "has no option 'bogus'" in error_line(capsys, ["defend", "ft", run, "--opt", "bogus=1", *DEMO[4:]])
    assert "epochs" in error_line(capsys, ["defend", "ft", run, "--epochs", "-1", *DEMO[4:]])
    assert sorted(p.name for p in (run / "defense").iterdir()) == before  # no "<variant>.partial"


def test_the_default_defense_folder_names_another_clean_ratio(run, capsys):
    from mapprune.jobs.defend import defend_run

    r = defend_run(run, "ft", epochs=1, clean_ratio=0.05, seed=1, device="cpu", progress=False)
    assert r["name"] == "ft-epochs1-ratio0.05-seed1" and r["clean_subset"]["ratio"] == 0.05
    r = defend_run(run, "ft", epochs=1, clean_ratio=0.1, device="cpu", progress=False, overwrite=True)
    assert r["name"] == "ft-epochs1"  # the default share keeps the plain name
    assert (run / "defense" / "ft-epochs1-ratio0.05-seed1" / "result.json").is_file()


# -- 8. a full disk ---------------------------------------------------------------------------------------------------

def _full_disk(monkeypatch, error, only: str | None = None):
    """Makes safetensors' save_file write half a file and then fail with ``error`` (for files named ``only``)."""
    real = checkpoint.save_file

    def save_file(tensors, filename, metadata=None):
        if only is not None and not Path(filename).name.startswith(f".{only}.tmp"):
            return real(tensors, filename, metadata=metadata)
        with open(filename, "wb") as f:
            f.write(b"\0" * 100)
        raise error

    monkeypatch.setattr(checkpoint, "save_file", save_file)


@pytest.mark.parametrize("error", [
    SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
    OSError(errno.ENOSPC, "No space left on device"),
])
def test_a_full_disk_is_one_error_and_leaves_no_temporary_file(tmp_path, monkeypatch, error):
    target = tmp_path / "model.safetensors"
    checkpoint.atomic_save({"w": torch.ones(3)}, target)
    before = target.read_bytes()
    _full_disk(monkeypatch, error)
    with pytest.raises(MapPruneError, match=r"could not write .*model.safetensors: no space left on device .*free "
                                            r"space and rerun the same command: it resumes"):
        checkpoint.atomic_save({"w": torch.zeros(3)}, target)
    assert target.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_another_write_failure_is_an_os_error_naming_the_file(tmp_path, monkeypatch):
    _full_disk(monkeypatch, SafetensorError("Error while serializing: I/O error: Permission denied (os error 13)"))
    with pytest.raises(OSError, match="could not write .*w.safetensors: .*Permission denied"):
        checkpoint.atomic_save({"w": torch.zeros(3)}, tmp_path / "w.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_during_defend_leaves_nothing_half_written(run, capsys, monkeypatch):
    _full_disk(monkeypatch, SafetensorError("I/O error: No space left on device (os error 28)"))
    err = error_line(capsys, ["defend", "ft", run, "--epochs", "1", "--name", "full", *DEMO[4:]])
    assert "no space left on device" in err and "rerun the same command" in err
    assert not (run / "defense" / "full").exists() and not (run / "defense" / "full.partial").exists()


def test_a_full_disk_during_attack_is_one_line_and_the_same_command_resumes(tmp_path, capsys, monkeypatch):
    argv = ["attack", "badnets", *DEMO, "--epochs", "2", "--out", tmp_path / "run"]
    _full_disk(monkeypatch, OSError(errno.ENOSPC, "No space left on device"), only="model.safetensors")
    err = error_line(capsys, argv)
    assert "model.safetensors: no space left on device" in err
    assert not (tmp_path / "run").exists() and (tmp_path / "run.partial" / "train_checkpoint.safetensors").is_file()
    assert not list((tmp_path / "run.partial").glob(".*tmp*"))
    monkeypatch.undo()
    assert main([str(a) for a in argv]) == 0
    assert "ACC" in capsys.readouterr().out
    assert (tmp_path / "run" / "model.safetensors").is_file() and not (tmp_path / "run.partial").exists()
