"""The shape of src/: stages are siblings (no command imports another command; libraries import no command),
library functions take explicit arguments rather than the whole Config, and no function grows past 80 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from tiny import ROOT

SRC = ROOT / "src"
MAX_FUNCTION_LINES = 80


def is_command(path: Path) -> bool:
    """A module with a ``if __name__ == "__main__"`` entry: a stage."""
    return "__main__" in path.read_text()


def imported_modules(path: Path) -> set[str]:
    """Every module an import statement of ``path`` names (``from lib import x`` names lib.x)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


STAGES = sorted(p.stem for p in SRC.glob("*.py") if is_command(p))
MODULES = sorted(SRC.rglob("*.py"))


def test_the_stages_are_the_commands_of_src() -> None:
    assert sorted(
        ["resize", "folds", "train", "distill", "finetune", "stack", "package", "predict", "score", "report"]
    ) == STAGES
    assert not [p for p in (SRC / "lib").glob("*.py") if is_command(p)], "a library with a __main__ entry"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_no_module_imports_a_stage(path: Path) -> None:
    imported = imported_modules(path) & set(STAGES)
    assert not imported, f"{path.relative_to(ROOT)} imports the stage(s) {sorted(imported)}: move what they share to src/lib/"


@pytest.mark.parametrize(
    "path", [p for p in sorted((SRC / "lib").glob("*.py")) if p.name != "config.py"], ids=lambda p: p.name
)
def test_library_functions_take_explicit_arguments_not_the_config(path: Path) -> None:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            for arg in [*node.args.args, *node.args.kwonlyargs]:
                annotation = ast.unparse(arg.annotation) if arg.annotation else ""
                assert annotation != "Config", f"{path.name}:{node.lineno} {node.name}({arg.arg}: Config)"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(SRC)))
def test_no_function_over_80_lines(path: Path) -> None:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            lines = node.end_lineno - node.lineno + 1
            assert lines <= MAX_FUNCTION_LINES, f"{path.name}:{node.lineno} {node.name} has {lines} lines"
