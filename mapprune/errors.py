"""One exception type for everything a user can get wrong.

The CLI catches :class:`MapPruneError` and prints its message as a single line, so every message must say
what was wrong and what to do about it.
"""


class MapPruneError(Exception):
    """A user-facing error: bad input, missing data, unusable checkpoint."""


class MapPruneWarning(UserWarning):
    """Something the user should know that does not stop the work (the CLI prints it as one line; a library
    user filters it with the ``warnings`` module)."""


def unknown_name(kind: str, name: str, valid) -> MapPruneError:
    """The error for a name that is not in a registry; it lists the valid names."""
    return MapPruneError(f"unknown {kind} {name!r}; valid {kind}s: {', '.join(sorted(valid))}")
