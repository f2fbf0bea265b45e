"""``mapprune bench GRID --out DIR``: an attack x defense x seed grid as one resumable, parallel job.

A grid is a TOML file (see ``benchmarks/grids/``)::

    name = "digits-tiny"
    dataset = "digits"          # any --dataset; data_dir = "..." optional (else --data-dir / $MAPPRUNE_DATA)
    preset = "demo"             # training preset of the backdoored models; [model] overrides its values
    clean_ratio = 0.1           # the defenders' clean share (optional; the protocol's default otherwise)
    seeds = [0, 1]              # defense seeds (the clean subset and every random choice of a defense)

    [[attack]]
    name = "badnets"            # poison_ratio, target, all_to_all, train_seed and opts = {...} optional;
                                # run = "path" adopts a finished run folder instead of training one;
                                # adopt_defenses = true also adopts its defense results whose settings match
                                # a cell's exactly (result.json says "adopted_from")
    [[defense]]
    name = "fmt"
    opts = {recipe = "paper"}   # any option of the defense; clean_ratio = 0.05 overrides the grid's
    sweep = {eps = [0.02, 0.1], clean_ratio = [0.02]}   # optional: one more cell per value, one setting
                                # changed at a time from opts (a sensitivity analysis: figures/sweep-*.png)

A grid may name published numbers to print beside its own: ``reference = "path.toml"`` (relative to the grid
file; see ``benchmarks/reference/``), a table of ACC / ASR / RA in % per attack and defense label::

    name = "BackdoorBench leaderboard, CIFAR-10, PreActResNet-18"
    [cells]
    badnets = {none = [91.32, 95.03, 4.67], nc = [89.05, 1.27, 89.16]}

It changes no cell: table.md gains the same tables filled with the published numbers, for the attacks and
defenses the grid has.

Every cell (one backdoored model, or one defense on one model with one seed) is keyed by a stable hash of its
full settings and written as an ordinary run folder: ``DIR/runs/<attack>-<hash>/`` (readable by ``eval``,
``defend``, ``report``) and its ``defense/<variant>-<hash>[-seedN]/``. A cell whose folder is complete is never
recomputed; a changed setting is a new cell. Failures are recorded in ``DIR/failed/`` and do not stop the other
cells. The results: ``DIR/results.csv``, ``DIR/table.md`` and ``DIR/figures/``. ``--only LABEL ...`` runs the cells
of some attacks only (the same keys and folders as in the whole grid) and writes the results of every cell done.

Faults: one bench at a time writes DIR (an OS lock beside it, ``.DIR.lock``: a second bench fails at once naming
the first, and a killed one leaves nothing locked). SIGTERM and ^C stop the worker processes (exit status 143 and
130); rerunning the same command finishes what is missing. Every file the bench writes is written atomically. A
cell counts as complete only when its files verify; a damaged cell's folder is moved to ``DIR/damaged/`` and the
cell is run again. A grid that would run one cell twice (a repeated seed, two identical attacks or defenses) is
refused before any work.

The modules, in the order a bench uses them: ``grid`` (the grid file), ``keys`` (labels and the hashed settings
that key a cell), ``plan`` (the cells), ``folder`` (the folder's lock, bench.json, damaged/), ``scheduler``
(``run_bench``), ``engines`` (where cells run), ``cells`` (one cell's work), ``results``, ``tables`` and
``figures`` (what a bench writes).
"""

from .cells import run_cell
from .engines import BACKENDS, Terminated
from .grid import Grid, Sweep, load_grid, load_reference
from .plan import Cell, plan, select
from .results import collect, write_results
from .scheduler import run_bench
from .tables import markdown, summarise, sweep_markdown

__all__ = ["BACKENDS", "Cell", "Grid", "Sweep", "Terminated", "collect", "load_grid", "load_reference", "markdown",
           "plan", "run_bench", "run_cell", "select", "summarise", "sweep_markdown", "write_results"]
