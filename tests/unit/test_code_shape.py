"""Small parts: no module in relay/ or connectors/ over 400 lines, no function over 50, no class
over 200 (a function's or class's lines count from its first decorator)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = ("relay", "connectors")
MAX_MODULE, MAX_FUNCTION, MAX_CLASS = 400, 50, 200


def _lines(node: ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
    assert node.end_lineno is not None, "ast.parse sets end positions"
    return node.end_lineno - start + 1


def _oversized() -> dict[str, int]:
    found: dict[str, int] = {}
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            name = path.relative_to(ROOT).as_posix()
            text = path.read_text()
            if (count := len(text.splitlines())) > MAX_MODULE:
                found[name] = count
            for node in ast.walk(ast.parse(text)):
                if not isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                    continue
                limit = MAX_CLASS if isinstance(node, ast.ClassDef) else MAX_FUNCTION
                if (count := _lines(node)) > limit:
                    found[f"{name}:{node.name}"] = count
    return found


def test_no_module_function_or_class_is_over_its_limit() -> None:
    assert _oversized() == {}, f"over {MAX_MODULE}/{MAX_FUNCTION}/{MAX_CLASS} lines (module/function/class)"


def test_the_limits_are_measured_from_the_first_decorator_to_the_last_line() -> None:
    tree = ast.parse("@a\n@b\ndef f():\n    x = 1\n    return x\n")
    (function,) = tree.body
    assert isinstance(function, ast.FunctionDef)
    assert _lines(function) == 5
