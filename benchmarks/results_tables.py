"""Rewrite the generated tables of a markdown file from the bench folders they were measured in, or check them.

    python benchmarks/results_tables.py --doc docs/results.md --bench cifar10-cpu=bench/cifar10-cpu
    python benchmarks/results_tables.py --doc docs/results.md --bench cifar10-cpu=bench/cifar10-cpu --check

A generated table sits between two HTML comments (invisible on the page), each on a line of its own:

    <!-- table: BENCH KIND [attacks=A,B,...] [defenses=D,E,...] [reference=NAME] -->
    ...the table, rewritten by this script...
    <!-- end table -->

BENCH names a bench folder given as ``--bench BENCH=DIR`` (a folder ``mapprune bench GRID --out DIR`` wrote; its
results.csv is read), or a scan calibration given as ``--bench BENCH=FILE.json`` (written by ``mapprune
calibrate``). KIND is one of:

- ``asr-ra``: attacks x defenses, ASR (mean ± sd over seeds) / RA, with the average row (table.md's table);
- ``acc``: attacks x defenses, clean ACC (mean ± sd over seeds), with the average row (table.md's table);
- ``acc-asr-ra``: attacks x defenses, ACC / ASR / RA (means over seeds) in each cell, no average row;
- ``means``: each defense's mean ACC / ASR / RA over the attacks, with ``reference`` a column of its published
  means over the same attacks (what benchmarks/analysis/bench_average.py prints);
- ``seeds``: one defense (``defenses=`` names exactly one), ACC / ASR / RA seed by seed, the mean ASR and the
  mean change of clean ACC;
- ``calibration``: of a calibration file, the scan's held-out TPR and FPR by trigger family and by architecture,
  the AUROC, and the baselines' AUROC on the same models (mapprune.jobs.calibrate.held_out_tables).

``attacks`` and ``defenses`` select and order rows and columns by their labels in results.csv (all of them, in the
bench's order, when left out); ``label:Shown name`` shows a label under another name (no comma in it; quote the
value when the name has spaces: ``defenses="none,sau-rounds5:sau (5 rounds)"``). ``reference`` names a file of
benchmarks/reference/ without its .toml. Every number is formatted by mapprune.bench.tables, the bench's own.

A region whose BENCH is not given is left as it is and listed as not checked. With ``--check`` nothing is
written: the exit status is 1, each differing region named, when a table differs from what its bench folder gives.
A bad input (a missing folder, a bench without results.csv, an unknown kind, a marker without its end, an unknown
label) is one line and exit status 2, and the file is left as it was.
"""
import argparse
import re
import shlex
import sys
from pathlib import Path

from mapprune.bench.grid import load_reference
from mapprune.bench.results import read_results
from mapprune.bench.tables import cells_table, grid_table, means_table, seeds_table, summarise
from mapprune.errors import MapPruneError
from mapprune.jobs.calibrate import held_out_tables
from mapprune.jobs.scan import load_calibration
from mapprune.runs import atomic_write_text

REFERENCES = Path(__file__).resolve().parent / "reference"
KINDS = ("asr-ra", "acc", "acc-asr-ra", "means", "seeds", "calibration")
OPTIONS = ("attacks", "defenses", "reference")
# a region's opening comment (its spec may run over lines) or its end
MARKER = re.compile(r"<!--\s*(?:table:(?P<spec>.*?)|(?P<end>end table)\s*)-->", re.S)


class BadInput(Exception):
    """A problem with what was asked: one line, exit status 2."""


class Region:
    """One generated table of the file: its spec, where its content lies, the line of its opening marker."""

    def __init__(self, line: int, spec: str, start: int, end: int):
        self.line, self.start, self.end = line, start, end
        try:
            words = shlex.split(spec)
        except ValueError as e:
            raise BadInput(f"line {line}: cannot read the table marker ({e})") from None
        if len(words) < 2:
            raise BadInput(f"line {line}: a table marker names a bench and a kind: <!-- table: BENCH KIND ... -->")
        self.bench, self.kind = words[:2]
        if self.kind not in KINDS:
            raise BadInput(f"line {line}: unknown table kind {self.kind!r} (kinds: {', '.join(KINDS)})")
        self.options = {}
        for w in words[2:]:
            key, eq, value = w.partition("=")
            if not eq or key not in OPTIONS:
                raise BadInput(f"line {line}: unknown option {w!r} (options: {'=, '.join(OPTIONS)}=)")
            self.options[key] = value
        if "reference" in self.options and self.kind != "means":
            raise BadInput(f"line {line}: reference= is an option of the means table only")
        self.names = {}
        self.select = {k: self._selection(k) for k in ("attacks", "defenses")}
        if self.kind == "seeds" and (self.select["defenses"] is None or len(self.select["defenses"]) != 1):
            raise BadInput(f"line {line}: a seeds table is of one defense: defenses=LABEL")

    def _selection(self, key: str) -> list[str] | None:
        if key not in self.options:
            return None
        labels = []
        for item in self.options[key].split(","):
            label, _, shown = (s.strip() for s in item.partition(":"))
            if not label:
                raise BadInput(f"line {self.line}: {key}= has an empty label")
            labels.append(label)
            if shown:
                self.names[label] = shown
        return labels

    def __str__(self) -> str:
        return f"line {self.line} ({self.bench} {self.kind})"

    def table(self, rows: list[dict] | dict, folder: str) -> str:
        """The region's table from the bench's rows (a calibration's content for a calibration table)."""
        if self.kind != "calibration" and isinstance(rows, dict):
            raise BadInput(f"{self}: {folder} is a calibration file; its tables are of kind calibration")
        if self.kind == "calibration" and not isinstance(rows, dict):
            raise BadInput(f"{self}: {folder} is a bench folder; a calibration table reads a calibration file "
                           "(--bench NAME=FILE.json)")
        if self.kind == "calibration":
            return held_out_tables(rows)
        attacks = self._labels(rows, "attack", folder)
        defenses = self._labels(rows, "defense", folder)
        if self.kind == "seeds":
            if defenses == ["none"]:
                raise BadInput(f"{self}: a seeds table is of a defense, not of the undefended models")
            return "\n".join(seeds_table(rows, defenses[0], attacks, self.names))
        summary = summarise(rows)
        if self.kind in ("asr-ra", "acc"):
            lines = grid_table(summary, attacks, defenses, self.kind, self.names)
        elif self.kind == "acc-asr-ra":
            lines = cells_table(summary, attacks, defenses, self.names)
        else:
            ref = None
            if "reference" in self.options:
                path = REFERENCES / f"{self.options['reference']}.toml"
                if not path.is_file():
                    known = ", ".join(sorted(p.stem for p in REFERENCES.glob("*.toml")))
                    raise BadInput(f"{self}: no reference {self.options['reference']!r} in benchmarks/reference/ "
                                   f"(there: {known})")
                try:
                    ref = load_reference(path)
                except MapPruneError as e:
                    raise BadInput(f"{self}: {e}") from None
            lines, _ = means_table(summary, attacks, defenses, ref, self.names)
        return "\n".join(lines)

    def _labels(self, rows: list[dict], column: str, folder: str) -> list[str]:
        present = list(dict.fromkeys(r[column] for r in rows))
        chosen = self.select[f"{column}s"]
        if chosen is None:
            return present
        unknown = [x for x in chosen if x not in present]
        if unknown:
            raise BadInput(f"{self}: {folder} has no {column} {', '.join(map(repr, unknown))} (its {column}s: "
                           f"{', '.join(present)})")
        return chosen


def regions(text: str) -> list[Region]:
    """The generated regions of a markdown text, in order."""
    for m in re.finditer(r"<!--\s*table:", text):
        close, following = text.find("-->", m.end()), text.find("<!--", m.end())
        if close < 0 or 0 <= following < close:
            raise BadInput(f"line {text.count(chr(10), 0, m.start()) + 1}: a table marker without its closing -->")
    found, opened = [], None
    for m in MARKER.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        if m.group("end"):
            if opened is None:
                raise BadInput(f"line {line}: <!-- end table --> without a table marker before it")
            found.append(Region(opened[0], opened[1].group("spec"), opened[1].end(), m.start()))
            opened = None
        elif opened is not None:
            raise BadInput(f"line {opened[0]}: the table marker has no <!-- end table --> before the next one "
                           f"(line {line})")
        else:
            opened = (line, m)
    if opened is not None:
        raise BadInput(f"line {opened[0]}: the table marker has no <!-- end table -->")
    return found


def content(table: str) -> str:
    """What lies between a region's two markers: a blank line, the table, a blank line."""
    return f"\n\n{table}\n\n"


def first_difference(have: str, want: str, line: int) -> str:
    """Where a region's content ``have``, starting on the file's line ``line``, first differs from ``want``."""
    for i, (a, b) in enumerate(zip(have.split("\n"), want.split("\n"))):
        if a != b:
            return f"line {line + i} reads {a.strip()!r}, the bench gives {b.strip()!r}"
    return f"the table there has {have.count(chr(10)) - 3} lines, the bench gives {want.count(chr(10)) - 3}"


def benches(specs: list[str]) -> dict[str, str]:
    """{bench name: folder} of the --bench arguments, each folder holding a results.csv."""
    out = {}
    for spec in specs:
        name, eq, folder = spec.partition("=")
        if not eq or not name or not folder:
            raise BadInput(f"--bench {spec!r}: give it as NAME=DIR, e.g. cifar10-cpu=bench/cifar10-cpu")
        if name in out:
            raise BadInput(f"--bench {name} is given twice")
        if folder.endswith(".json"):
            if not Path(folder).is_file():
                raise BadInput(f"--bench {name}={folder}: no such calibration file")
            out[name] = folder
            continue
        if not Path(folder).is_dir():
            raise BadInput(f"--bench {name}={folder}: no such folder")
        if not (Path(folder) / "results.csv").is_file():
            raise BadInput(f"--bench {name}={folder}: the folder has no results.csv (not a bench folder, or no cell "
                           "is done yet)")
        out[name] = folder
    return out


def _calibration(path: str) -> dict:
    cal = load_calibration(path)
    return {k: v for k, v in cal.items() if not k.startswith("_")}


def run(doc: Path, bench_args: list[str], check: bool) -> dict:
    if not doc.is_file():
        raise BadInput(f"--doc {doc}: no such file")
    text = doc.read_text(encoding="utf-8")
    try:
        found = regions(text)
    except BadInput as e:
        raise BadInput(f"{doc}: {e}") from None
    folders = benches(bench_args)
    unused = sorted(set(folders) - {r.bench for r in found})
    if unused:
        raise BadInput(f"--bench {unused[0]}: {doc} has no table of a bench of that name (its benches: "
                       f"{', '.join(sorted({r.bench for r in found})) or 'none'})")
    rows = {}
    for name, folder in folders.items():
        try:
            rows[name] = _calibration(folder) if folder.endswith(".json") else read_results(folder)
        except MapPruneError as e:
            raise BadInput(str(e)) from None
    done, differs, not_checked, pieces, at, shift = [], [], [], [], 0, 0
    for r in found:
        have = text[r.start:r.end]
        if not check:
            r.line += shift  # written, the file's lines move: name each table by its line in what is written
        if r.bench not in folders:
            not_checked.append(r)
            continue
        try:
            want = content(r.table(rows[r.bench], folders[r.bench]))
        except BadInput as e:
            raise BadInput(f"{doc}: {e}") from None
        done.append(r)
        if have != want:
            differs.append((r, first_difference(have, want, text.count("\n", 0, r.start) + 1)))
        pieces += [text[at:r.start], want]
        at = r.end
        shift += want.count("\n") - have.count("\n")
    new = "".join(pieces) + text[at:]
    if not check and new != text:
        atomic_write_text(doc, new)
    differing = {id(r): where for r, where in differs}
    for r in found:
        if r in not_checked:
            print(f"{doc}: {r}: not checked (no --bench {r.bench}=DIR)")
        elif check:
            print(f"{doc}: {r} " + (f"differs from {folders[r.bench]}: {differing[id(r)]}" if id(r) in differing
                                    else f"matches {folders[r.bench]}"))
        else:
            print(f"{doc}: {r}: {'rewritten' if id(r) in differing else 'unchanged'} from {folders[r.bench]}")
    if check:
        print(f"{doc}: {len(done) - len(differs)} of {len(done)} tables match their bench folders"
              + (f", {len(not_checked)} not checked" if not_checked else ""))
        if differs:
            raise SystemExit(1)
    return {"checked": [str(r) for r in done], "differs": [str(r) for r, _ in differs],
            "not_checked": [str(r) for r in not_checked]}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="The marker syntax and the kinds of table: this script's docstring.")
    ap.add_argument("--doc", required=True, type=Path, help="the markdown file whose tables to rewrite or check")
    ap.add_argument("--bench", action="append", default=[], metavar="NAME=DIR",
                    help="a bench folder, by the name its tables give (repeat for several)")
    ap.add_argument("--check", action="store_true",
                    help="write nothing; exit 1 naming each table that differs from its bench folder")
    args = ap.parse_args(argv)
    try:
        return run(args.doc, args.bench, args.check)
    except BadInput as e:
        print(f"results_tables.py: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
