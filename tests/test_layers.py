"""Layers point one way: the algorithms (attacks, defenses, FMT's probes, detectors, data, models and the shared modules
they use) never import the layers that present or orchestrate them (results, figures, jobs, bench, cli and its commands), and the
probes import none of the algorithms built on them. Every import counts, including the ones inside functions."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mapprune"
LOWER = ("attacks", "defenses", "probes", "detect", "data", "models", "train", "metrics", "checkpoint", "images",
         "options", "errors", "device", "presets", "resources", "allocator", "clean_model", "guard", "cleanse")
UPPER = ("results", "figures", "jobs", "cli", "commands", "bench")
# FMT's per-map tests sit below everything that uses them (defenses, the scan, diagnose, the adaptive attacks).
ABOVE_PROBES = ("defenses", "attacks", "detect", "guard", "cleanse", *UPPER)


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


def _unexplained_lazy_imports(source: str) -> list[int]:
    """Lines of the imports inside functions that no ``# lazy:`` comment explains. A run of adjacent import statements
    is one block: a comment on one of its lines or on the line above it explains the whole block."""
    lines = source.splitlines()
    out = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for _, value in ast.iter_fields(node):
            if not (in_function and isinstance(value, list) and value and isinstance(value[0], ast.stmt)):
                continue
            block = []
            for stmt in [*value, None]:
                if isinstance(stmt, ast.Import | ast.ImportFrom):
                    block.append(stmt)
                    continue
                if block and not any("# lazy:" in line for line in lines[max(0, block[0].lineno - 2):block[-1].end_lineno]):
                    out.extend(s.lineno for s in block)
                block = []
        for child in ast.iter_child_nodes(node):
            visit(child, in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef))

    visit(ast.parse(source), False)
    return out


def test_imports_are_at_the_top_unless_a_comment_says_why():
    """An import inside a function is the exception (an optional dependency such as Ray, matplotlib only when a figure
    is drawn, a command's job kept out of the CLI's start, an import cycle): each says why in a ``# lazy:`` comment."""
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        wrong += [f"{path.relative_to(PACKAGE.parent)}:{line}" for line in _unexplained_lazy_imports(path.read_text())]
    assert not wrong, ("imports inside functions without a '# lazy: why' comment (move them to the top of the file, "
                       "or say why they cannot be):\n" + "\n".join(wrong))


def test_the_lazy_import_check_reads_blocks_and_comments():
    source = ("import os\n\n\ndef f():\n    # lazy: Ray is optional\n    import ray\n    from x import y\n\n    z = 1\n"
              "    import json\n    if z:\n        import sys  # lazy: reason\n\n\nclass C:\n    def g(self):\n"
              "        from . import a\n")
    assert _unexplained_lazy_imports(source) == [10, 17]
