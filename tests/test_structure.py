"""The package's structure, enforced: imports point down the pipeline's layers, no import cycle, no
private name used across modules, typer only in the command line, and no long module without a
reason written at its top.

Layers, top to bottom (shared/DESIGN.md): cli -> experiments -> api | evaluation -> passes |
calibration -> op -> graph -> prepare | errors | progress. A module may import modules of its own
subpackage and of lower layers only; siblings on one layer (api and evaluation, passes and
calibration) stay independent of each other. The package root (``scap_onnx/__init__.py``, the
public face) is exempt: importing ``scap_onnx`` for ``__version__`` is allowed anywhere.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "scap_onnx"
LAYERS = [("cli",), ("experiments",), ("api", "evaluation"), ("passes", "calibration"), ("op",), ("graph",),
          ("prepare", "errors", "progress")]
LONG_MODULE_LINES = 400
LONG_MODULE_REASON = "Why this module is long:"


def _group(module: str) -> str:
    """scap_onnx.evaluation.latency -> "evaluation"; scap_onnx.cli -> "cli"; scap_onnx -> ""."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _layer(group: str) -> int:
    for i, names in enumerate(LAYERS):
        if group in names:
            return i
    raise AssertionError(f"scap_onnx.{group} is in no layer of this test: add it to LAYERS")


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(module: str, path: Path) -> list[tuple[str, list[str], int]]:
    """(imported scap_onnx module, names taken from it, line) for every import in the file,
    function-level ones included."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == "scap_onnx"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "scap_onnx":
                continue
            names = [a.name for a in node.names]
            # `from . import api` imports the module scap_onnx.api
            sub = [n for n in names if f"{target}.{n}" in MODULES]
            if sub:
                found += [(f"{target}.{n}", [], node.lineno) for n in sub]
                names = [n for n in names if n not in sub]
            if names:
                found.append((target, names, node.lineno))
    return found


EDGES = {m: _imports(m, p) for m, p in MODULES.items()}


def test_every_module_is_in_a_layer():
    for m in MODULES:
        if m != "scap_onnx":
            _layer(_group(m))


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m != "scap_onnx"))
def test_imports_point_down(module):
    mine = _group(module)
    for target, _, line in EDGES[module]:
        theirs = _group(target)
        if target == "scap_onnx" or theirs == mine:
            continue
        assert _layer(theirs) > _layer(mine), (
            f"{module} (line {line}) imports {target}: scap_onnx.{mine} may only import lower layers")


def test_no_import_cycle():
    graph = {m: {t for t, _, _ in EDGES[m] if t in MODULES and t != "scap_onnx"} for m in MODULES}
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(t):] + [t]))
            if t not in state:
                visit(t, path + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_private_names_across_modules(module):
    for target, names, line in EDGES[module]:
        private = [n for n in names if n.startswith("_") and not n.startswith("__")]
        assert not private, f"{module} (line {line}) uses private {private} of {target}"


def test_typer_only_in_the_command_line():
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        uses = [n.lineno for n in ast.walk(tree)
                if (isinstance(n, ast.Import) and any(a.name.split(".")[0] == "typer" for a in n.names))
                or (isinstance(n, ast.ImportFrom) and (n.module or "").split(".")[0] == "typer")]
        assert module == "scap_onnx.cli" or not uses, f"{module} imports typer (line {uses[0] if uses else ''})"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_long_modules_say_why(module):
    path = MODULES[module]
    lines = path.read_text(encoding="utf-8").splitlines()
    if len(lines) > LONG_MODULE_LINES:
        doc = ast.get_docstring(ast.parse("\n".join(lines))) or ""
        assert LONG_MODULE_REASON in doc, (
            f"{path.relative_to(PACKAGE.parent)} has {len(lines)} lines: split it, or say at its top "
            f"'{LONG_MODULE_REASON} ...'")


def test_the_checks_can_fail(tmp_path):
    """The import reader sees relative, absolute and function-level imports (so the checks above
    are not vacuous)."""
    f = tmp_path / "m.py"
    f.write_text("from ..graph import view\nfrom .latency import _x\ndef f():\n    import scap_onnx.cli\n")
    found = _imports("scap_onnx.evaluation.m", f)
    assert ("scap_onnx.graph.view", [], 1) in found and ("scap_onnx.evaluation.latency", ["_x"], 2) in found
    assert ("scap_onnx.cli", [], 4) in found
    assert _layer(_group("scap_onnx.cli")) < _layer(_group("scap_onnx.evaluation.m"))
