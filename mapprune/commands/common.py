"""What the commands share: the parser whose usage errors are one line, the argument types, the options every
command takes, and ``KEY=VALUE`` option lists."""

import argparse
import json
import math

from ..errors import MapPruneError


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (what was wrong, and where the help is), not the whole usage."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def finite(s: str) -> float:
    """A float flag's value: a finite number (NaN and infinity refused)."""
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a number") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"{s!r} is not a finite number")
    return v


def ratio(s: str) -> float:
    """A fraction flag's value: a number in [0, 1]."""
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a number") from None
    if not 0 <= v <= 1:
        raise argparse.ArgumentTypeError(f"{v} is out of range; give a fraction in [0, 1]")
    return v


def add_common(p: argparse.ArgumentParser) -> None:
    """The options of every command that loads data or a model: data folder, device, progress bars, threads."""
    p.add_argument("--data-dir", help="dataset folder (default: $MAPPRUNE_DATA)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice; on a shared "
                   "machine 1 per job is often faster in total)")


def add_poison_choice(p: argparse.ArgumentParser) -> None:
    """The options that choose the poisoned images: `prepare` must be given the same ones as the `attack` run."""
    p.add_argument("--poison-ratio", type=ratio, default=0.1,
                   help="share of the whole training set poisoned (default %(default)s); clean-label attacks draw "
                        "from the target class only")
    p.add_argument("--target", type=int, default=0, help="target label (default %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="which images are poisoned and, for attack, the training (default %(default)s)")


def set_threads(args: argparse.Namespace) -> None:
    """Applies ``--threads`` to torch where the command has it and it was given; refuses a count below 1."""
    threads = getattr(args, "threads", None)
    if threads is None:
        return
    if threads < 1:
        raise MapPruneError(f"--threads must be >= 1, got {threads}")
    # lazy: torch loads only when the command runs, after the arguments are checked
    import torch

    torch.set_num_threads(threads)


def key_values(pairs: list[str], flag: str = "--attack-opt") -> dict:
    """``KEY=VALUE`` strings -> {KEY: VALUE}, dashes in KEY read as underscores, VALUE parsed as JSON where it is
    JSON (else kept as the string)."""
    opts = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise MapPruneError(f"{flag} takes KEY=VALUE, got {pair!r}")
        try:
            opts[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            opts[key.replace("-", "_")] = value
    return opts
