"""The ``bench`` command's job: ``mapprune bench GRID --out DIR`` runs an attack x defense x seed grid. The grid
runner is the package :mod:`mapprune.bench` (grid file, cells, engines, results); this module names its public
functions and classes among the jobs."""

from ..bench import (
    BACKENDS,
    Cell,
    Grid,
    Sweep,
    Terminated,
    collect,
    load_grid,
    load_reference,
    markdown,
    plan,
    run_bench,
    run_cell,
    select,
    summarise,
    sweep_markdown,
    write_results,
)

__all__ = ["BACKENDS", "Cell", "Grid", "Sweep", "Terminated", "collect", "load_grid", "load_reference", "markdown",
           "plan", "run_bench", "run_cell", "select", "summarise", "sweep_markdown", "write_results"]
