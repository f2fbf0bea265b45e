"""The documentation holds: the site builds under ``mkdocs build --strict`` (every page, link, anchor and API page),
every relative link and file reference in README.md and docs/*.md points into the repository, every quoted
``mapprune ...`` command parses, every quoted command that works on the embedded digits runs as written, and no
file of the project speaks of the history of its development."""

import fnmatch
import glob
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL_LANGS = {"", "bash", "sh", "shell", "console", "text"}  # fenced blocks whose commands are checked


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def test_the_site_builds_strict(tmp_path):
    """mkdocs.yml with strict mode and link validation on: a broken link, a missing anchor, a page left out of the
    nav or an API page whose docstring does not render is a warning, and a warning fails the build."""
    pytest.importorskip("mkdocs", reason="mkdocs is not installed (pip install -e '.[docs]')")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "WARNING" not in out, out
    assert (tmp_path / "site" / "index.html").is_file()
    assert (tmp_path / "site" / "api" / "index.html").is_file()


# ---------------------------------------------------------------------------------------------------- markdown


def _blocks(text: str):
    """(first line number, language, lines) of every code block: fenced (``` or ~~~) and indented (four spaces or a
    tab after a blank line, outside a fence)."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        fence = re.match(r"^\s*(```+|~~~+)\s*([\w+-]*)", lines[i])
        if fence:
            mark, lang, start, body = fence.group(1), fence.group(2).lower(), i + 2, []
            i += 1
            while i < len(lines) and not lines[i].strip().startswith(mark):
                body.append(lines[i])
                i += 1
            yield start, lang, body
            i += 1
            continue
        if re.match(r"^( {4}|\t)\S", lines[i]) and (i == 0 or not lines[i - 1].strip()):
            start, body = i + 1, []
            while i < len(lines) and (re.match(r"^( {4}|\t)", lines[i]) or not lines[i].strip()):
                body.append(lines[i])
                i += 1
            yield start, "", body
            continue
        i += 1


def _outside_code(text: str) -> str:
    """The text with its code blocks, fences included, blanked (line numbers kept)."""
    lines = text.splitlines()
    for start, _, body in _blocks(text):
        fenced = start >= 2 and re.match(r"^\s*(```|~~~)", lines[start - 2])
        first, last = (start - 2, start + len(body)) if fenced else (start - 1, start - 1 + len(body))
        for k in range(first, min(last, len(lines))):
            lines[k] = ""
    return "\n".join(lines)


def _prose(text: str) -> str:
    """The text without its code blocks and inline code spans (line numbers kept)."""
    return re.sub(r"`[^`]+`", lambda m: "\n" * m.group(0).count("\n"), _outside_code(text))


def _code_spans(text: str):
    """(line number, content) of every inline code span outside code blocks (a span may run over lines)."""
    outside = _outside_code(text)
    for m in re.finditer(r"`([^`]+)`", outside):
        yield outside.count("\n", 0, m.start()) + 1, " ".join(m.group(1).split())


LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)|^\s*\[[^\]]+\]:\s*(\S+)", re.M)
# A reference to a file of the repository written as inline code: `mapprune/defenses/fmt.py`, `docs/fmt.md`.
REPO_PATH = re.compile(r"^(README\.md|mkdocs\.yml|pyproject\.toml|requirements\.txt|(docs|mapprune|benchmarks|tests)/"
                       r"[\w./*-]*)$")


def test_relative_links_point_into_the_repository():
    """Every relative link and every file path quoted as code in README.md and docs/*.md exists in the repository,
    and nothing points at ../shared (the project's neighbours, which a reader does not have) but the data folder."""
    bad = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for m in LINK.finditer(_prose(text)):
            target = m.group(1) or m.group(2)
            line = _prose(text).count("\n", 0, m.start()) + 1
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
                continue  # a URL, a mail address or an anchor on the same page
            path = target.split("#")[0]
            resolved = (page.parent / path).resolve()
            if "shared" in Path(path).parts or not resolved.is_relative_to(REPO) or not resolved.exists():
                bad.append(f"{_rel(page)}:{line}: link {target!r} does not point to a file of the repository")
        for line, code in _code_spans(text):
            if REPO_PATH.match(code) and not glob.glob(str(REPO / code)):
                bad.append(f"{_rel(page)}:{line}: `{code}` names a file the repository does not have")
        for i, row in enumerate(text.splitlines(), 1):
            for m in re.finditer(r"\.\./shared/([\w.-]*)", row):
                if m.group(1) != "data":
                    bad.append(f"{_rel(page)}:{i}: {m.group(0)!r} is outside the repository (only ../shared/data, "
                               "the datasets folder, may be named)")
    assert not bad, "\n".join(bad)


# ---------------------------------------------------------------------------------------------------- commands

OPERATORS = set("();<>|&")
# The command word: `mapprune`, `.venv/bin/mapprune` or `python -m mapprune`, at the start or after a shell operator.
COMMAND = re.compile(r"(?:^|(?<=[\s;&|(]))(?:[\w.~-]*/)*mapprune(?=\s|$)")


def _commands(page: Path):
    """(line, argv) of every ``mapprune ...`` command in the page's shell code blocks: continuation lines joined,
    comments dropped, cut at the first shell operator; ``...`` (more options) is left out."""
    for start, lang, body in _blocks(page.read_text(encoding="utf-8")):
        if lang not in SHELL_LANGS:
            continue
        k = 0
        while k < len(body):
            first, line = start + k, body[k]
            while line.rstrip().endswith("\\") and k + 1 < len(body):
                k += 1
                line = line.rstrip()[:-1] + " " + body[k]
            k += 1
            code = re.split(r"(?:^|\s)#", line, maxsplit=1)[0]  # a shell comment runs to the end of the line
            for command in COMMAND.finditer(code):
                lex = shlex.shlex(code[command.end():], posix=True, punctuation_chars=True)
                lex.whitespace_split = True
                try:
                    tokens = list(lex)
                except ValueError as e:
                    yield first, line, e
                    continue
                argv = []
                for t in tokens:
                    if set(t) <= OPERATORS:
                        break
                    if t != "...":
                        argv.append(t)
                yield first, line, argv


def test_every_quoted_command_parses(capsys):
    """Each `mapprune ...` command of README.md and docs/*.md is accepted by the command line's own parser
    (placeholders such as RUN or DIR are positional strings; commands that need files are parsed, not run)."""
    from mapprune.cli import build_parser

    parser, bad, seen = build_parser(), [], 0
    for page in PAGES:
        for line, text, argv in _commands(page):
            seen += 1
            if isinstance(argv, Exception):
                bad.append(f"{_rel(page)}:{line}: cannot split {text.strip()!r}: {argv}")
                continue
            try:
                parser.parse_args(argv)
            except SystemExit as e:
                err = capsys.readouterr().err.strip().splitlines()
                if e.code:
                    bad.append(f"{_rel(page)}:{line}: mapprune {shlex.join(argv)}\n    {err[-1] if err else e}")
    assert seen > 20, f"only {seen} commands found: the code-block reader is broken"
    assert not bad, "\n".join(bad)


# A word of two capitals or more in a token is a template's placeholder: RUN, DATA, runs/c10-ATTACK, HEAD:6379.
PLACEHOLDER = re.compile(r"(?<![A-Za-z])[A-Z]{2,}(?![a-z])")
# The exit status a quoted command is expected to end with, when its own comment states it: `# exits 3: ...`.
EXITS = re.compile(r"#.*?\bexits (\d+)\b")
COMMAND_TIMEOUT_S = 180  # a digits command takes seconds; the slowest quoted one (the digits grid) about 20 s


def _grid_on_digits(grid: Path) -> bool:
    """Whether every dataset a grid file names is the embedded digits (a grid that cannot be read is not)."""
    try:
        spec = tomllib.loads(grid.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError):
        return False
    found = []

    def walk(node):
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "dataset":
                    found.append(v)
                else:
                    walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
    walk(spec)
    return bool(found) and all(d == "digits" for d in found)


def _runnable(page: Path, parser, repo_files: set[str]):
    """(line, argv, expected exit status, whether it reads what an earlier command made, its --out, the repository
    files it reads) of every command of the page that runs in seconds as written. A command runs when it has no
    placeholder, every path it reads (its Path-typed arguments but --out and --data-dir) is a file of the
    repository or lies in (or is a glob matching) what a running command before it on the page wrote with --out,
    and it works on the embedded digits: it reads such a folder, says --dataset digits, is the demo, or runs a grid
    whose every dataset is the digits. A --help form always runs. Every other command is only parsed."""
    made: list[str] = []
    for line, text, argv in _commands(page):
        if isinstance(argv, Exception):
            continue
        expected = int(m.group(1)) if (m := EXITS.search(text)) else 0
        if "-h" in argv or "--help" in argv:
            yield line, argv, 0, False, None, []
            continue
        if any(PLACEHOLDER.search(t) for t in argv):
            continue
        try:
            ns = parser.parse_args(argv)
        except SystemExit:
            continue  # test_every_quoted_command_parses names it
        inputs = [str(v) for k, value in vars(ns).items() if k not in ("out", "data_dir")
                  for v in (value if isinstance(value, list) else [value]) if isinstance(v, Path)]
        from_made = [p for p in inputs
                     if any(fnmatch.fnmatchcase(m, p) or Path(p).is_relative_to(m) for m in made)]
        from_repo = [p for p in inputs if p not in from_made and p in repo_files]
        if len(from_made) + len(from_repo) < len(inputs):
            continue  # a file of the reader's own, or of a command that does not run here
        on_digits = (bool(from_made) or ns.command == "demo" or getattr(ns, "dataset", None) == "digits"
                     or (ns.command == "bench" and _grid_on_digits(REPO / ns.grid)))
        if not on_digits:
            continue
        out = getattr(ns, "out", None)
        if out is not None:
            made.append(str(out))
        yield line, argv, expected, bool(from_made), None if out is None else str(out), from_repo


def _shell_words(argv: list[str], cwd: Path) -> list[str]:
    """The arguments as the shell passes them: a glob becomes its sorted matches, or stays as written if none."""
    words = []
    for a in argv:
        matches = sorted(glob.glob(a, root_dir=cwd)) if glob.has_magic(a) else []
        words.extend(matches or [a])
    return words


def _tail(text: str, n: int = 12) -> str:
    lines = [s for s in re.split(r"[\r\n]+", text) if s.strip()]
    return "\n      ".join(lines[-n:])


def test_the_run_rule_runs_digits_commands_and_what_they_made(tmp_path):
    """The rule that picks the commands to run: digits commands and the commands on their folders run, with the
    exit status their comment states; CIFAR-10, checkpoints of the reader's own and templates are parsed only."""
    from mapprune.cli import build_parser

    page = tmp_path / "page.md"
    page.write_text("""```bash
mapprune attack badnets --dataset digits --preset demo --out runs/d   # trains
mapprune attack badnets --dataset cifar10 --out runs/c
mapprune defend fmt runs/c
mapprune defend fmt runs/d
mapprune scan runs/d --no-nc                                          # exits 3: "backdoored"
mapprune report runs/*
mapprune scan model.safetensors --arch smallcnn --num-classes 10 --dataset digits
mapprune defend DEFENSE runs/d
mapprune bench benchmarks/grids/digits-tiny.toml --out bench/digits
mapprune bench benchmarks/grids/cifar10-cpu.toml --out bench/c10
mapprune demo
mapprune eval --help
```
""", encoding="utf-8")
    files = {"benchmarks/grids/digits-tiny.toml", "benchmarks/grids/cifar10-cpu.toml"}
    picked = [(shlex.join(argv), expected) for _, argv, expected, *_ in _runnable(page, build_parser(), files)]
    assert picked == [("attack badnets --dataset digits --preset demo --out runs/d", 0),
                      ("defend fmt runs/d", 0), ("scan runs/d --no-nc", 3), ("report 'runs/*'", 0),
                      ("bench benchmarks/grids/digits-tiny.toml --out bench/digits", 0), ("demo", 0),
                      ("eval --help", 0)], picked


def test_digits_commands_run_as_written(tmp_path):
    """Every quoted command that works on the embedded digits (the rule: _runnable) runs as written from a fresh
    folder per page, in the page's order, and ends with the exit status its comment states (0 unless it says
    `exits N`). The repository files it reads (a grid) are copied in; a command quoted again on another page, on
    nothing made before it, runs once and its --out is copied. One torch thread per command."""
    from mapprune.cli import build_parser

    parser, repo_files = build_parser(), {_rel(p) for p in _project_files()}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("MAPPRUNE_DATA", None)  # the digits need no data folder
    already: dict[tuple, tuple[Path, str | None]] = {}
    ran, bad = [], []
    for page in PAGES:
        work = tmp_path / _rel(page).replace("/", "-")
        work.mkdir()
        for line, argv, expected, reads_made, out, from_repo in _runnable(page, parser, repo_files):
            where = f"{_rel(page)}:{line}: mapprune {shlex.join(argv)}"
            key = tuple(argv)
            if not reads_made and key in already:
                before, before_out = already[key]
                if before_out and (before / before_out).exists():
                    copy = shutil.copytree if (before / before_out).is_dir() else shutil.copy2
                    (work / before_out).parent.mkdir(parents=True, exist_ok=True)
                    copy(before / before_out, work / before_out)
                continue
            for f in from_repo:
                (work / f).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / f, work / f)
            start = time.monotonic()
            try:
                done = subprocess.run([sys.executable, "-m", "mapprune", *_shell_words(argv, work)], cwd=work,
                                      env=env, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                bad.append(f"{where}\n    still running after {COMMAND_TIMEOUT_S} s")
                break  # what follows on the page reads what this one makes
            ran.append((where, round(time.monotonic() - start, 1)))
            if done.returncode != expected:
                bad.append(f"{where}\n    exit status {done.returncode}, the page says {expected}:\n      "
                           + _tail(done.stdout + done.stderr))
                break
            if not reads_made:
                already[key] = (work, out)
    assert not bad, "\n".join(bad)
    names = {w.split(": mapprune ")[1].split()[0] for w, _ in ran}
    assert names >= {"attack", "defend", "eval", "scan", "report", "bench", "demo"}, (
        f"the quoted digits commands that ran cover only {sorted(names)}: {ran}")


# ---------------------------------------------------------------------------------------------------- history

ORDINALS = ("first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth|eleventh|twelfth|thirteenth|"
            "fourteenth|fifteenth|sixteenth|seventeenth|eighteenth|nineteenth|twentieth")
# Phrases that name moments of the project's development rather than what the code does or what was measured.
HISTORY = [
    re.compile(r"\bsessions?\b", re.I),
    re.compile(r"\bissues? #?\d+", re.I),
    re.compile(rf"\b({ORDINALS}) session", re.I),
    re.compile(r"(?<![\w./@-])v\d\b"),  # research-iteration tags (v5, v6); not paths such as tests/fixtures/run-v0
    re.compile(r"\bacceptance status\b", re.I),
    re.compile(r"\bqueued for the next\b", re.I),
]
# pytest's own spelling of a fixture scope is code, not prose.
ALLOWED = re.compile(r"""scope\s*=\s*["']session["']""")


def _project_files() -> list[Path]:
    try:
        listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                                capture_output=True, text=True, check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: git ls-files cannot list the project's files")
    return [REPO / f for f in sorted(set(listed)) if (REPO / f).is_file()]


def test_no_file_speaks_of_the_development_history():
    """Product text speaks of the product: no "session", no "issue N", no research-iteration tags like "v5" in any
    text file of the project (git keeps the history). Fails listing file:line for every hit."""
    me = Path(__file__).resolve()
    hits = []
    for path in _project_files():
        if path.resolve() == me:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a binary file
        if "\0" in text:
            continue
        for i, line in enumerate(text.splitlines(), 1):
            prose = ALLOWED.sub("", line)
            for pattern in HISTORY:
                m = pattern.search(prose)
                if m:
                    hits.append(f"{_rel(path)}:{i}: {m.group(0)!r} in: {line.strip()[:140]}")
                    break
    assert not hits, f"{len(hits)} lines name the development history:\n" + "\n".join(hits)


@pytest.mark.parametrize("page", ["README.md", "docs/results.md"])
def test_the_pages_generated_tables_are_well_formed_regions(page):
    """The tables README and the results page take from bench folders sit in regions the table script reads
    (without the bench folders, each region is reported as not checked, and nothing fails)."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "results_tables.py"
    r = subprocess.run([sys.executable, str(script), "--doc", page, "--check"], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0 and "not checked" in r.stdout, r.stdout + r.stderr
