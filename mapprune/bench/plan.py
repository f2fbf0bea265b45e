"""A grid's cells: :class:`Cell` (one backdoored model, or one defense on one model with one seed, keyed by a hash
of its settings and written as an ordinary run or defense folder), :func:`plan` (every cell of a grid) and
:func:`select` (the cells of some attacks only)."""

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import MapPruneError
from .grid import Grid
from .keys import attack_label, defense_label, defense_settings, model_settings, settings_hash

# the file that says a cell of each kind is finished, in its folder
MARKERS = {"model": "manifest.json", "defense": "result.json", "relapse": "relapse.json",
           "cleanse": "cleanse/bench.json", "guard": "guard/model/bench.json"}
# kinds that measure a model other cells made: their marker holds the cell's key (another key: redo it)
MEASUREMENTS = ("relapse", "cleanse", "guard")


@dataclass
class Cell:
    """One unit of work: ``kind`` "model" (train or adopt a backdoored model), "defense", or a measurement:
    "relapse" (``mapprune relapse`` on a model or a defended model, beside the grid's clean control), "cleanse"
    (``mapprune cleanse`` on a model's training set), "guard" (``mapprune guard`` on a model)."""

    kind: str  # "model", "defense", or a measurement: "relapse", "cleanse", "guard"
    label: str  # attack label, or "attack label / defense label / seed N" (+ " / relapse")
    key: str
    settings: dict
    path: str  # the run folder (model) or the defense folder (defense)
    deps: list[str] = field(default_factory=list)
    attack: str = ""
    defense: str = ""
    seed: int | None = None

    def marker(self) -> Path:
        """The file that says the cell is finished (:data:`MARKERS`)."""
        return Path(self.path) / MARKERS[self.kind]

    def verify(self) -> tuple[dict | None, str | None]:
        """(the marker's content, None) when the cell's files verify: the marker parses as a JSON object and a
        model cell's model.safetensors exists. Otherwise (None, what is wrong), or (None, None) when the cell's
        folder does not exist (not run yet)."""
        folder, marker = Path(self.path), self.marker()
        if not folder.exists():
            return None, None
        try:
            obj = json.loads(marker.read_text())
        except FileNotFoundError:
            return None, f"{marker} is missing"
        except (OSError, ValueError) as e:  # ValueError: JSONDecodeError, UnicodeDecodeError
            return None, f"{marker} is not valid JSON ({e})"
        if not isinstance(obj, dict):
            return None, f"{marker} is not a JSON object"
        if self.kind == "model" and not (folder / "model.safetensors").is_file():
            return None, f"{folder / 'model.safetensors'} is missing"
        if self.kind in MEASUREMENTS and obj.get("bench_key") != self.key:
            return None, None  # made by hand or with other settings: not this cell's, run it (again)
        return obj, None

    def done(self) -> bool:
        """True when the cell's files verify (:meth:`verify`): a damaged cell is not done, and is rerun."""
        return self.verify()[0] is not None


def plan(grid: Grid, out: Path) -> list[Cell]:
    """Every cell of the grid, models first, each defense cell depending on its model."""
    cells = []
    for a in grid.attacks:
        label = attack_label(a)
        settings, dataset = model_settings(grid, a)
        key = settings_hash(settings)
        run = out / "runs" / f"{label}-{key}"
        model_cell = Cell("model", label, key, {**settings, "source": a.get("run")}, str(run), attack=label)
        cells.append(model_cell)
        for d in grid.defenses:
            dlabel = defense_label(d)
            for seed in grid.seeds:
                dset = defense_settings(grid, d, key, dataset)
                # The folder is named by the defense's settings alone, so one defense lines up across models.
                dkey = settings_hash({k: v for k, v in dset.items() if k != "model"})
                folder = f"{dlabel}-{dkey}" + (f"-seed{seed}" if seed else "")
                # Where finished results may be adopted from is not a setting: it is not hashed.
                adopt = {"adopt_from": a["run"]} if a.get("adopt_defenses") else {}
                cells.append(Cell("defense", f"{label} / {dlabel} / seed {seed}", settings_hash({**dset, "seed": seed}),
                                  {**dset, "seed": seed, **adopt}, str(run / "defense" / folder), [key],
                                  attack=label, defense=dlabel, seed=seed))
    if grid.relapse is not None:
        cells += _relapse_cells(grid, cells)
    for kind, table in (("cleanse", grid.cleanse), ("guard", grid.guard)):
        if table is not None:
            cells += [Cell(kind, f"{c.label} / {kind}", settings_hash({kind: table, "of": c.key}),
                           {kind: table}, c.path, [c.key], attack=c.attack, defense="none")
                      for c in cells if c.kind == "model"]
    return cells


def _relapse_cells(grid: Grid, cells: list[Cell]) -> list[Cell]:
    """One relapse cell per model and defended model of the grid, the control's own excepted: each depends on its
    cell and on the control model's, and is keyed by both keys and the [relapse] settings."""
    control_label = grid.relapse["control"]
    control = next(c for c in cells if c.kind == "model" and c.attack == control_label)
    settings = {k: v for k, v in grid.relapse.items() if k != "control"}
    out = []
    for c in cells:
        if c.attack == control_label:
            continue
        run = c.path if c.kind == "model" else str(Path(c.path).parent.parent)
        rset = {"relapse": settings, "of": c.key, "control": control.key}
        out.append(Cell("relapse", f"{c.label} / relapse", settings_hash(rset),
                        {**rset, "run": run, "defense": None if c.kind == "model" else Path(c.path).name,
                         "control_run": control.path},
                        c.path, sorted({c.key, control.key}), attack=c.attack,
                        defense=c.defense or "none", seed=c.seed))
    return out


def select(cells: list[Cell], grid: Grid, labels: list[str] | None) -> list[Cell]:
    """The cells of the attacks labelled ``labels`` (each model cell and its defense cells); all of them when
    ``labels`` is None. A label the grid does not have is refused in one line that lists the grid's labels."""
    if labels is None:
        return cells
    valid = grid.attack_labels()
    unknown = [x for x in labels if x not in valid]
    if unknown:
        raise MapPruneError(f"--only: the grid has no attack labelled {unknown[0]!r}; valid labels: {', '.join(valid)}")
    chosen = [c for c in cells if c.attack in labels]
    if grid.relapse is not None and any(c.kind == "relapse" for c in chosen):
        # the relapse cells need the control model: its cell comes along (done at once when it is trained)
        chosen += [c for c in cells if c.kind == "model" and c.attack == grid.relapse["control"] and c not in chosen]
    return chosen
