"""mapprune bench under faults: one bench per folder (a second fails at once, naming the first; a SIGKILLed one
leaves no lock), SIGTERM / ^C / SIGKILL leave no worker process (local or Ray) and a rerun finishes the grid with
the same numbers, a full disk never leaves a half-written results file, damaged files give one line or a rerun of
the cell, and a grid that would run one cell twice is refused before any work."""

import csv
import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mapprune.bench import collect, load_grid, plan, run_bench, write_results
from mapprune.errors import MapPruneError, MapPruneWarning

# Two attacks (two model cells start at once with --jobs 2) and the data-free CLP defense: about 5 s of work.
SMALL = '''name = "faults"
dataset = "digits"
preset = "demo"
seeds = [0]

[model]
epochs = 2

[[attack]]
name = "badnets"

[[attack]]
name = "blended"

[[defense]]
name = "clp"
'''
METRICS = ("attack", "defense", "seed", "acc", "asr", "ra", "acc_before", "asr_before", "ra_before", "der")
REPO = Path(__file__).resolve().parents[1]
needs_proc = pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads processes from /proc (Linux)")


def _quiet(*a, **k):
    pass


def _metrics(out: Path) -> list[dict]:
    with open(out / "results.csv") as f:
        return sorted(({k: r[k] for k in METRICS} for r in csv.DictReader(f)),
                      key=lambda r: (r["attack"], r["defense"], r["seed"]))


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "mapprune", "bench", *map(str, args), "--threads", "1", "--no-progress"]


def _env() -> dict:
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(_cli(*args), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=180)


def _start(tmp_path: Path, *args: str) -> tuple[subprocess.Popen, Path, Path]:
    """A bench in the background: (process, its stdout file, its stderr file)."""
    stdout, stderr = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with open(stdout, "w") as o, open(stderr, "w") as e:
        proc = subprocess.Popen(_cli(*args), cwd=REPO, env=_env(), stdout=o, stderr=e)
    return proc, stdout, stderr


def _one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def _wait_for(what, proc: subprocess.Popen, timeout: float = 90.0) -> None:
    end = time.monotonic() + timeout
    while not what():
        assert proc.poll() is None, f"the bench exited early with status {proc.returncode}"
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields after the command name (state first, then the parent pid); None if gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()


def _children(pid: int, deep: bool = False) -> dict[int, str]:
    """{pid: start time} of the live child processes of ``pid`` (``deep``: and theirs, and so on)."""
    procs = {int(d.name): s for d in Path("/proc").iterdir() if d.name.isdigit() and (s := _stat(int(d.name)))}
    kids, parents = {}, {pid}
    while parents:
        found = {p: s[19] for p, s in procs.items() if int(s[1]) in parents and s[0] != "Z" and p not in kids}
        kids.update(found)
        parents = set(found) if deep else set()
    return kids


def _children_running(pid: int, marker: bytes, deep: bool = False) -> list[int]:
    """The child processes of ``pid`` whose command line holds ``marker``."""
    out = []
    for kid in _children(pid, deep):
        try:
            if marker in Path(f"/proc/{kid}/cmdline").read_bytes():
                out.append(kid)
        except OSError:
            pass
    return out


def _workers(pid: int) -> list[int]:
    """The spawned worker processes of a bench process."""
    return _children_running(pid, b"spawn_main")


def _still_alive(procs: dict[int, str]) -> list[int]:
    """Which of {pid: start time} still run (a reused pid has another start time; a zombie has ended)."""
    return [pid for pid, start in procs.items() if (s := _stat(pid)) and s[19] == start and s[0] != "Z"]


def _mentioning(folder: Path) -> list[int]:
    """Live processes whose command line names ``folder``."""
    out = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and str(folder).encode() in (d / "cmdline").read_bytes() and _stat(int(d.name))[0] != "Z":
                out.append(int(d.name))
        except (OSError, TypeError):
            pass
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The small grid, run once without interruption: (grid file, its folder)."""
    tmp = tmp_path_factory.mktemp("faults")
    grid = tmp / "small.toml"
    grid.write_text(SMALL)
    out = tmp / "reference"
    r = run_bench(grid, out, progress=False, log=_quiet)
    assert r["done"] == r["cells"] == 4 and not r["failed"]
    return grid, out


@needs_proc
def test_a_second_bench_on_one_folder_fails_naming_the_first_and_a_killed_one_leaves_no_lock(reference, tmp_path):
    grid, ref = reference
    out = tmp_path / "out"
    first, _, _ = _start(tmp_path, grid, "--out", out)
    try:
        _wait_for(lambda: (out / "bench.json").is_file(), first)  # written under the lock
        os.kill(first.pid, signal.SIGSTOP)  # holds its lock, paused, for as long as this test needs
        second = _run(grid, "--out", out)
        assert second.returncode == 2
        line = _one_line(second.stderr)
        assert f"{out.resolve()} is being written by another mapprune bench" in line and f"pid {first.pid}" in line, line
        assert "bench" in line.split(f"pid {first.pid}")[1]  # its command
    finally:
        first.kill()  # SIGKILL: no cleanup runs; the kernel drops the lock
        first.wait()
    third = _run(grid, "--out", out)
    assert third.returncode == 0, third.stderr
    assert _metrics(out) == _metrics(ref)


@needs_proc
@pytest.mark.parametrize("sig, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130), (signal.SIGKILL, -9)])
def test_a_signal_stops_the_workers_and_a_rerun_finishes_the_grid(reference, tmp_path, sig, status):
    """SIGTERM and ^C: the bench stops its workers and says so in one line. SIGKILL (no cleanup can run): the
    workers see their bench gone and exit."""
    grid, ref = reference
    out = tmp_path / "out"
    proc, stdout, stderr = _start(tmp_path, grid, "--out", out, "--jobs", "2")
    try:
        _wait_for(lambda: stdout.read_text().count("started") >= 2 and len(_workers(proc.pid)) == 2, proc)
        # a worker is training (a cell's unfinished folder is there), or a cell is done already
        _wait_for(lambda: any((out / "runs").rglob("*.partial")) or "finished" in stdout.read_text(), proc)
        kids = _children(proc.pid, deep=True)  # the workers and multiprocessing's resource tracker
        assert len(kids) >= 2
        os.kill(proc.pid, sig)
        assert proc.wait(timeout=60) == status
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if sig != signal.SIGKILL:
        line = _one_line(stderr.read_text())
        assert "rerun the same command" in line, line
    end = time.monotonic() + 10  # the resource tracker exits when it sees its parent gone
    while (alive := _still_alive(kids)) and time.monotonic() < end:
        time.sleep(0.1)
    assert not alive, f"left running: {alive}"
    assert not _mentioning(out), "a process of the bench runs on"
    again = _run(grid, "--out", out, "--jobs", "2")
    assert again.returncode == 0, again.stderr
    assert _metrics(out) == _metrics(ref)


@needs_proc
def test_sigterm_stops_the_ray_tasks(reference, tmp_path):
    """--backend ray: SIGTERM cancels the running tasks, the local Ray instance goes with the bench, exit 143."""
    pytest.importorskip("ray", reason="Ray is an optional extra (pip install 'mapprune[ray]')")
    grid, ref = reference
    out = tmp_path / "out"
    proc, stdout, stderr = _start(tmp_path, grid, "--out", out, "--jobs", "2", "--backend", "ray")
    try:
        _wait_for(lambda: any((out / "runs").rglob("*.partial")) or "finished" in stdout.read_text(), proc, 150)
        kids = _children(proc.pid, deep=True)  # Ray's processes and the workers running the tasks
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=60) == 143
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = stderr.read_text()
    assert "Traceback" not in text and "bench stopped by SIGTERM" in text.splitlines()[-1], text
    end = time.monotonic() + 20
    while (alive := _still_alive(kids)) and time.monotonic() < end:
        time.sleep(0.2)
    assert not alive, f"left running: {alive}"
    again = _run(grid, "--out", out, "--jobs", "2", "--backend", "ray")
    assert again.returncode == 0, again.stderr
    assert _metrics(out) == _metrics(ref)


def _ray_task_workers(pid: int) -> list[int]:
    """The Ray worker processes under ``pid`` that are running a bench cell (Ray names them ray::run_cell)."""
    return _children_running(pid, b"run_cell", deep=True)


@needs_proc
def test_a_killed_ray_worker_is_retried_and_the_table_matches(reference, tmp_path):
    """--backend ray: a worker killed in the middle of a cell is retried by Ray; the cell resumes from what its
    .partial folder holds and the grid ends with the table of an uninterrupted local run."""
    pytest.importorskip("ray", reason="Ray is an optional extra (pip install 'mapprune[ray]')")
    grid, ref = reference
    out = tmp_path / "out"
    proc, _, stderr = _start(tmp_path, grid, "--out", out, "--jobs", "2", "--backend", "ray")
    try:
        _wait_for(lambda: _ray_task_workers(proc.pid) and any((out / "runs").rglob("*.partial")), proc, 150)
        victim = _ray_task_workers(proc.pid)[0]
        os.kill(victim, signal.SIGKILL)
        assert proc.wait(timeout=170) == 0, stderr.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert _metrics(out) == _metrics(ref)
    assert not list((out / "failed").glob("*.json")) if (out / "failed").is_dir() else True


@pytest.mark.parametrize("victim", ["results.csv", "table.md"])
def test_a_full_disk_leaves_the_previous_results_intact(reference, tmp_path, monkeypatch, victim):
    grid_path, ref = reference
    out = tmp_path / "copy"
    shutil.copytree(ref, out)
    grid = load_grid(grid_path)
    grid.name = "renamed"  # a new table.md would differ
    cells = plan(grid, out)[:-1]  # and so would a new results.csv
    before = (out / victim).read_bytes()
    real = os.replace

    def full(src, dst, *a, **k):
        if Path(dst).name == victim:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return real(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OSError) as e:
        write_results(cells, grid, out)
    assert e.value.errno == errno.ENOSPC
    assert (out / victim).read_bytes() == before
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")], "a temporary file was left behind"


def test_a_failed_write_of_the_data_itself_keeps_the_old_file(tmp_path, monkeypatch):
    from mapprune.runs import atomic_write_text

    path = tmp_path / "results.csv"
    atomic_write_text(path, "a,b\n1,2\n")

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError):
        atomic_write_text(path, "a,b\n3,4\n")
    assert path.read_text() == "a,b\n1,2\n" and [p.name for p in tmp_path.iterdir()] == ["results.csv"]


def test_a_damaged_bench_json_gives_one_line(reference, tmp_path):
    grid, ref = reference
    out = tmp_path / "out"
    shutil.copytree(ref, out)
    (out / "bench.json").write_text('{"name": "faults", "grid_ha')  # as a crash of an older version left it
    r = _run(grid, "--out", out)
    assert r.returncode == 2
    line = _one_line(r.stderr)
    assert str(out / "bench.json") in line and "damaged" in line and "--update" in line, line
    for text in ("[1, 2]", '{"grid_hash": 3}', "\udcff"):
        (out / "bench.json").write_text(text, errors="surrogateescape")
        with pytest.raises(MapPruneError, match="bench.json is damaged .*--update"):
            run_bench(grid, out, progress=False, log=_quiet)
    r = run_bench(grid, out, update=True, progress=False, log=_quiet)  # rewrites it; every cell is kept
    assert r["ran"] == [] and r["done"] == 4
    assert run_bench(grid, out, progress=False, log=_quiet)["ran"] == []


def test_damaged_cells_are_left_out_of_the_results_then_run_again(reference, tmp_path):
    grid_path, ref = reference
    out = tmp_path / "out"
    shutil.copytree(ref, out)
    grid = load_grid(grid_path)
    cells = plan(grid, out)
    models = [c for c in cells if c.kind == "model"]
    defenses = [c for c in cells if c.kind == "defense"]
    (Path(defenses[0].path) / "result.json").write_text('{"after": {"acc": 0.9')  # cut short
    (Path(models[1].path) / "manifest.json").write_text("[]")  # not an object
    assert not defenses[0].done() and not models[1].done() and models[0].done()
    with pytest.warns(MapPruneWarning) as caught:
        rows = collect(cells)
    messages = " | ".join(str(w.message) for w in caught)
    assert "result.json is not valid JSON" in messages and "manifest.json is not a JSON object" in messages, messages
    # the damaged model's defense is fine on its own: its row stays
    assert len(rows) == 2 and {r["key"] for r in rows} == {models[0].key, defenses[1].key}
    with pytest.warns(MapPruneWarning, match="is run again"):
        r = run_bench(grid_path, out, progress=False, log=_quiet)
    assert r["done"] == 4 and not r["failed"]
    # the damaged defense, the damaged model and the defense inside its folder; never the sound model
    assert set(r["ran"]) == {defenses[0].key, models[1].key, defenses[1].key}
    assert _metrics(out) == _metrics(ref)
    assert (out / "damaged" / Path(models[1].path).relative_to(out) / "manifest.json").read_text() == "[]"
    assert not (out / "damaged" / "results.csv").exists()

    (Path(models[0].path) / "model.safetensors").unlink()
    assert not models[0].done()
    (Path(defenses[1].path) / "result.json").write_text('{"defense": "clp"}')  # an object without the metrics
    with pytest.warns(MapPruneWarning) as caught:
        rows = collect(cells)
    messages = " | ".join(str(w.message) for w in caught)
    assert "model.safetensors is missing" in messages and "lacks an expected field" in messages, messages
    assert {r["key"] for r in rows} == {models[1].key, defenses[0].key}


@pytest.mark.parametrize("edit, names", [
    (("seeds = [0]", "seeds = [0, 1, 0]"), ["seeds = [0, 1, 0] repeats 0"]),
    (('[[defense]]', '[[attack]]\nname = "badnets"\nlabel = "again"\npoison_ratio = 0.1\n\n[[defense]]'),
     ["attacks 'badnets' and 'again' have identical settings"]),
    (('name = "clp"\n', 'name = "clp"\n\n[[defense]]\nname = "clp"\nlabel = "clp-again"\n'),
     ["defenses 'clp' and 'clp-again' have identical settings"]),
])
def test_a_grid_that_repeats_a_cell_is_refused_before_any_work(tmp_path, edit, names):
    assert edit[0] in SMALL
    grid = tmp_path / "grid.toml"
    grid.write_text(SMALL.replace(edit[0], edit[1], 1))
    r = _run(grid, "--out", tmp_path / "out")
    assert r.returncode == 2
    line = _one_line(r.stderr)
    assert all(n in line for n in names), line
    assert not (tmp_path / "out").exists()
