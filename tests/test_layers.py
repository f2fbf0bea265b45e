"""Layers point one way: the algorithms (attacks, defenses, FMT's probes, detectors, data, models and the shared modules
they use) never import the layers that present or orchestrate them (results, figures, jobs, bench, cli and its commands), and the
probes import none of the algorithms built on them. Every import counts, including the ones inside functions."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mapprune"
LOWER = ("attacks", "defenses", "probes", "detect", "data", "models", "train", "metrics", "checkpoint", "images",
         "options", "errors", "device", "presets", "resources", "allocator", "clean_model")
UPPER = ("results", "figures", "jobs", "cli", "commands", "bench")
# FMT's per-map tests sit below everything that uses them (defenses, the scan, diagnose, the adaptive attacks).
ABOVE_PROBES = ("defenses", "attacks", "detect", *UPPER)


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path``."""
    module = _module(path)
    return _imports_in(path.read_text(), module if path.name == "__init__.py" else module.rsplit(".", 1)[0])


def _imports_in(source: str, package: str) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.append((node.lineno, target))
            out += [(node.lineno, f"{target}.{a.name}") for a in node.names]
    return out


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "mapprune" else None


def test_lower_layers_never_import_upper_ones():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if _layer(_module(path)) not in LOWER:
            continue
        for line, target in _imports(path):
            if _layer(target) in UPPER:
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}")
    assert not wrong, "\n".join(wrong)


def test_probes_import_nothing_that_uses_them():
    wrong = []
    for path in sorted((PACKAGE / "probes").rglob("*.py")):
        for line, target in _imports(path):
            if _layer(target) in ABOVE_PROBES:
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}")
    assert not wrong, "\n".join(wrong)


def test_the_walker_sees_relative_and_lazy_imports():
    """The check above is only as good as its import reader: it resolves relative imports inside functions."""
    found = {t for _, t in _imports(PACKAGE / "defenses" / "nc.py")}
    assert "mapprune.defenses.base" in found
    lazy = "import torch\n\ndef f():\n    from ..figures import save_defense_figures\n    from . import base\n"
    got = _imports_in(lazy, "mapprune.defenses")
    assert (4, "mapprune.figures") in got and (5, "mapprune.defenses") in got and _layer("mapprune.figures") in UPPER
