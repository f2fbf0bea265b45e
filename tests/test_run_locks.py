"""Two writers never mix a run: a second `attack` to one --out, or a second `defend` of one variant, fails at once
with one line naming the first, and the first finishes with its own settings throughout."""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mapprune.errors import MapPruneError
from mapprune.runs import RunWriter, acquire_folder_lock


def _start(*args, cwd):
    return subprocess.Popen([sys.executable, "-m", "mapprune", *map(str, args)], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc, seconds: float = 120) -> None:
    end = time.monotonic() + seconds
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < end, f"{path} never appeared"
        time.sleep(0.05)


def test_a_second_writer_of_one_folder_is_refused_naming_the_first(tmp_path):
    first = RunWriter(tmp_path / "run")
    with pytest.raises(MapPruneError, match=r"run is being written by another mapprune command \(pid \d+"):
        RunWriter(tmp_path / "run")
    first.path("manifest.json").write_text("{}")
    first.finish()
    with pytest.raises(MapPruneError, match="already holds a run"):  # the lock is free again; the run is complete
        RunWriter(tmp_path / "run")
    RunWriter(tmp_path / "run", overwrite=True).close()


def test_a_refused_writer_releases_the_lock(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "stray.txt").write_text("x")
    for _ in range(2):  # the refusal released the lock: the same refusal, not "being written"
        with pytest.raises(MapPruneError, match="holds no mapprune run"):
            RunWriter(tmp_path / "run")
    acquire_folder_lock(tmp_path / "run", "command").release()


def test_two_attacks_to_one_out_never_mix(tmp_path):
    first = _start("attack", "badnets", "--dataset", "digits", "--preset", "demo", "--target", "0",
                   "--out", "run", "--threads", "1", "--no-progress", cwd=tmp_path)
    _wait_for(tmp_path / ".run.lock.holder", first)
    second = subprocess.run([sys.executable, "-m", "mapprune", "attack", "badnets", "--dataset", "digits",
                             "--preset", "demo", "--target", "3", "--out", "run", "--threads", "1", "--no-progress"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert second.returncode == 2
    assert second.stderr.strip().count("\n") == 0 and "being written by another mapprune command" in second.stderr
    assert f"pid {first.pid}" in second.stderr
    out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["attack"]["target"] == 0
    assert not (tmp_path / "run.partial").exists()


def test_two_defenses_of_one_variant_never_mix(digits_backdoor, tmp_path):
    src, _ = digits_backdoor
    run = tmp_path / "run"
    shutil.copytree(src, run, ignore=shutil.ignore_patterns("defense", "scan"))
    first = _start("defend", "ft", run, "--opt", "epochs=40", "--opt", "batch_size=32", "--threads", "1",
                   "--no-progress", cwd=tmp_path)
    _wait_for(run / "defense" / ".ft-epochs40-batchsize32.lock.holder", first)
    second = subprocess.run([sys.executable, "-m", "mapprune", "defend", "ft", str(run), "--opt", "epochs=40",
                             "--opt", "batch_size=32", "--threads", "1", "--no-progress"],
                            capture_output=True, text=True, timeout=300)
    assert second.returncode == 2, second.stderr
    assert "being written by another mapprune command" in second.stderr
    assert second.stderr.strip().count("\n") == 0
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err
    result = json.loads((run / "defense" / "ft-epochs40-batchsize32" / "result.json").read_text())
    assert result["params"]["epochs"] == 40
    assert sorted(p.name for p in (run / "defense").iterdir() if not p.name.startswith(".")) == \
        ["ft-epochs40-batchsize32"]
