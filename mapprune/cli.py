"""The ``mapprune`` command: builds the parser from the command modules (mapprune/commands/), runs the chosen
command, and turns its errors into one line and an exit status."""

import sys
import warnings

from .allocator import keep_freed_memory
from .commands import (
    attack,
    bench,
    calibrate,
    cleanse,
    defend,
    demo,
    diagnose,
    evaluate,
    guard,
    import_backdoorbench,
    prepare,
    relapse,
    report,
    scan,
)
from .commands.common import Parser, set_threads
from .errors import MapPruneError, MapPruneWarning

# Every command, in the order `mapprune --help` lists them.
COMMANDS = (attack, scan, guard, cleanse, calibrate, import_backdoorbench, evaluate, defend, relapse, report, bench,
            diagnose, demo, prepare)


def build_parser() -> Parser:
    """The top-level parser with one subparser per module of ``COMMANDS``."""
    ap = Parser(prog="mapprune", description="Find and remove backdoors in image classifiers.")
    sub = ap.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return ap


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    print(f"mapprune: warning: {message}", file=sys.stderr if file is None else file)


def _show_warnings_on_one_line() -> None:
    """mapprune's warnings: every one shown, each as one line."""
    warnings.simplefilter("always", MapPruneWarning)
    warnings.showwarning = _one_line_warning


def main(argv=None) -> int:
    """Parses ``argv``, runs the command and returns its exit status: 2 for a usage or input error
    (:class:`MapPruneError`, one line), 1 for an OS error (disk full, permission denied), 130 for ^C. ``bench``
    answers its own interruption (130 for ^C, 143 for SIGTERM, a line saying how to resume the grid)."""
    args = build_parser().parse_args(argv)
    _show_warnings_on_one_line()
    keep_freed_memory()
    handlers = {command.NAME: command.run for command in COMMANDS}
    try:
        set_threads(args)
        return handlers[args.command](args)
    except MapPruneError as e:
        print(f"mapprune: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, permission denied: the message says which file
        print(f"mapprune: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("mapprune: interrupted; rerun the same command to resume from the last finished epoch",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
