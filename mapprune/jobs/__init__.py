"""The commands' jobs, one file per command: ``attack`` (train a backdoored model into a run folder), ``defend``,
``prepare``, ``bench``, ``diagnose``, ``scan``, ``import_backdoorbench`` and the ``demo``. Each is what the CLI
calls and what Python users call; the building blocks they use live in the package above (models, attacks,
defenses, data, train, metrics, runs, report)."""
