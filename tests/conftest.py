"""Shared fixtures. Tests are small and CPU-only; real-data tests skip when ../shared/data is absent."""

import os
from pathlib import Path

import pytest
import torch

from mapprune.allocator import keep_freed_memory

# One thread (override with MAPPRUNE_TEST_THREADS): the models here are tiny, and on a shared machine several
# threads oversubscribe the cores (a 2-epoch digits run goes from ~2 s to ~27 s while another process keeps
# both cores of a 2-core machine busy).
torch.set_num_threads(int(os.environ.get("MAPPRUNE_TEST_THREADS", "1")))
keep_freed_memory()  # as the command line does: big tensors are not page-faulted in afresh at every allocation

REPO = Path(__file__).resolve().parents[1]
# The user's own cache setting, before the whole-run fixture below points MAPPRUNE_CACHE at a temporary folder.
USER_CACHE = os.environ.get("MAPPRUNE_CACHE")


@pytest.fixture(autouse=True, scope="session")
def _isolated_env(tmp_path_factory):
    """Every test writes its decoded-image cache into a temporary folder, never into ~/.cache, and sees no
    MAPPRUNE_DATA from the user's shell."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MAPPRUNE_CACHE", str(tmp_path_factory.mktemp("cache")))
        mp.delenv("MAPPRUNE_DATA", raising=False)
        yield


@pytest.fixture
def user_cache(monkeypatch):
    """For real-data tests: use the normal cache, so 60,000 JPEGs are decoded once per machine, not per run."""
    if USER_CACHE is None:
        monkeypatch.delenv("MAPPRUNE_CACHE")
    else:
        monkeypatch.setenv("MAPPRUNE_CACHE", USER_CACHE)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real datasets: $MAPPRUNE_TEST_DATA, else ../shared/data next to the repository."""
    env = os.environ.get("MAPPRUNE_TEST_DATA")
    path = Path(env) if env else REPO.parent / "shared" / "data"
    if not path.is_dir():
        pytest.skip(f"real datasets not found at {path} (set MAPPRUNE_TEST_DATA to the shared data folder)")
    return path


@pytest.fixture(scope="session")
def digits_backdoor(tmp_path_factory):
    """A BadNets-backdoored small CNN on the embedded 8x8 digits (the demo preset): (run folder, loaded run).
    Tests that defend it copy the folder first."""
    from mapprune.jobs.attack import attack_run
    from mapprune.runs import load_run

    out = tmp_path_factory.mktemp("digits") / "badnets"
    attack_run("badnets", out, dataset="digits", preset="demo", progress=False)
    return out, load_run(out)


@pytest.fixture(scope="session")
def digits_defender(digits_backdoor):
    """ratio -> (backdoored digits model, a clean class-balanced share ``ratio`` of its training set (images,
    labels), its test sets, its metrics before any defense)."""
    from mapprune.data import clean_subset
    from mapprune.metrics import evaluate

    _, run = digits_backdoor
    tests = run.test_sets()
    before = evaluate(run.model, tests)
    assert before["asr"] > 0.9

    def make(ratio: float):
        idx = clean_subset(run.dataset.y_train, ratio, 0)
        return run.model, run.dataset.x_train[idx], run.dataset.y_train[idx], tests, before
    return make
