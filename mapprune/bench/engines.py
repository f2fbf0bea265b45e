"""Where cells run: in the bench process (``--jobs 1``), in a pool of spawned worker processes (``--jobs N``) or as
Ray tasks (``--backend ray``); and how SIGTERM, ^C and a dead bench process stop them."""

import concurrent.futures as cf
import multiprocessing as mp
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from ..errors import MapPruneError
from .cells import run_cell

BACKENDS = ("local", "ray")


def _worker_init(parent: int) -> None:
    """Runs first in each local worker process: ^C is left to the bench process (which stops its workers), and a
    worker whose bench process died (SIGKILL, out of memory) exits instead of running on unowned."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(1)

    threading.Thread(target=watch, name="bench-parent-watch", daemon=True).start()


class LocalEngine:
    """--jobs N on the local backend: N spawned worker processes."""

    def __init__(self, jobs: int, threads: int | None):
        self.cf = cf
        self.pool = cf.ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"),
                                           initializer=_worker_init, initargs=(os.getpid(),))

    def submit(self, *args):
        return self.pool.submit(run_cell, *args)

    def wait(self, running: dict) -> list:
        done, _ = self.cf.wait(list(running), return_when=self.cf.FIRST_COMPLETED)
        return [(f, f.result()) for f in done]

    def close(self, abort: bool = False) -> None:
        """Shuts the pool down; with ``abort`` (an interrupt or an error) it first terminates the worker
        processes, so no cell runs on after the bench stopped."""
        if abort:
            workers = list((self.pool._processes or {}).values())
            for p in workers:
                p.terminate()
            for p in workers:
                p.join(10)
                if p.is_alive():
                    p.kill()
                    p.join()
        self.pool.shutdown(wait=True, cancel_futures=True)


class RayEngine:
    """--backend ray: one Ray task per cell."""

    def __init__(self, jobs: int, threads: int | None, address: str | None):
        try:
            import ray  # lazy: Ray is optional (the ray extra)
        except ImportError:
            raise MapPruneError("--backend ray needs Ray: pip install 'mapprune[ray]'") from None
        self.ray = ray
        if not ray.is_initialized():
            bench_handler = signal.getsignal(signal.SIGTERM)
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
            if callable(bench_handler) and threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, bench_handler)  # ray.init installs SIGTERM handlers of its own
        self.remote = ray.remote(num_cpus=threads or 1)(run_cell)
        self.pending: set = set()

    def submit(self, *args):
        ref = self.remote.remote(*args)
        self.pending.add(ref)
        return ref

    def wait(self, running: dict) -> list:
        done, _ = self.ray.wait(list(running), num_returns=1)
        self.pending.difference_update(done)
        return [(f, self.ray.get(f)) for f in done]

    def close(self, abort: bool = False) -> None:
        """With ``abort``, cancels the tasks still running (force: their worker processes are killed)."""
        if abort:
            for ref in self.pending:
                try:
                    self.ray.cancel(ref, force=True)
                except Exception:  # already finished, or the cluster is gone
                    pass
        self.pending.clear()


class InlineEngine:
    """--jobs 1 on the local backend: cells run in this process (their own progress bars show)."""

    def submit(self, *args):
        return run_cell(*args)

    def close(self, abort: bool = False) -> None:
        pass


class Terminated(KeyboardInterrupt):
    """SIGTERM received while a bench runs: it stops the bench as ^C does (the CLI exits with status 143)."""


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """While the bench runs, SIGTERM raises :class:`Terminated` in the main thread, so the bench stops its workers
    on the way out; left alone where the process has a SIGTERM handler of its own or this is not the main thread.
    A second SIGTERM during the cleanup is ignored."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL):
        yield
        return

    received = []

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        received.append(signum)
        raise Terminated()

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    except KeyboardInterrupt as e:
        if received and not isinstance(e, Terminated):  # a library (Ray) turned it into a plain KeyboardInterrupt
            raise Terminated() from e
        raise
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
