"""The bench folder's bookkeeping: its write lock, ``bench.json`` (the grid that made the folder) and
``damaged/`` (where the folder of a cell whose files do not verify is moved before the cell runs again)."""

import json
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import MapPruneError, MapPruneWarning
from ..runs import acquire_folder_lock, atomic_write_text
from .grid import Grid
from .plan import Cell


@contextmanager
def locked(out: Path) -> Iterator[None]:
    """Holds the write lock of ``out`` (an OS lock beside it, which the kernel drops when the process dies, even by
    SIGKILL): a second bench on the same folder fails at once with one line naming this one."""
    lock = acquire_folder_lock(out.resolve(), "bench")  # one lock for every spelling of the folder
    try:
        yield
    finally:
        lock.release()


def claim(out: Path, grid: Grid, grid_path: Path, update: bool) -> None:
    """DIR/bench.json names the grid that made DIR; another grid is refused unless ``update``, and so is a damaged
    bench.json (``update`` rewrites it)."""
    out.mkdir(parents=True, exist_ok=True)
    meta = out / "bench.json"
    digest = grid.digest()
    if meta.is_file():
        try:
            old = json.loads(meta.read_text())
            if not isinstance(old, dict) or not isinstance(old.get("grid_hash"), str):
                raise ValueError("not an object with a grid_hash string")
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            if not update:
                raise MapPruneError(f"{meta} is damaged ({e}); pass --update to rewrite it from this grid (the "
                                    "finished cells are kept)") from None
            old = {"grid_hash": digest}
        if old["grid_hash"] != digest and not update:
            raise MapPruneError(f"{out} was made by grid {old.get('name')!r} with other settings; pass --update to "
                                "add this grid's cells to it (unchanged cells are kept), or choose another --out")
    elif any(p for p in out.iterdir()):
        raise MapPruneError(f"{out} is not empty and was not made by mapprune bench; choose another --out")
    atomic_write_text(meta, json.dumps({"name": grid.name, "grid_hash": digest, "grid": grid.to_dict()}, indent=1))
    atomic_write_text(out / "grid.toml", grid_path.read_bytes())


def set_aside(c: Cell, out: Path, problem: str) -> None:
    """Moves a damaged cell's folder under ``out/damaged/`` (kept to look at, out of the results), so the cell is
    run again, and says so."""
    folder = Path(c.path)
    try:
        dest = out / "damaged" / folder.relative_to(out)
    except ValueError:
        dest = out / "damaged" / folder.name
    base, n = dest, 1
    while dest.exists():
        dest, n = base.with_name(f"{base.name}.{n}"), n + 1
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(folder, dest)
    warnings.warn(f"{problem}: {c.label} is run again (its folder was moved to {dest})", MapPruneWarning,
                  stacklevel=3)
