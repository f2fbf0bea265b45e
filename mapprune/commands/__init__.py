"""The ``mapprune`` subcommands, one module per command. Each module holds ``NAME`` (the command as typed),
``add_parser(subparsers)`` (its arguments) and ``run(args) -> int`` (what it calls and prints; the exit status).
``common`` holds the argument types and options they share, ``lines`` the sentences both ``defend`` and ``scan``
print."""
