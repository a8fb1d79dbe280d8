"""The data package's shape: functions fit on one screen. (That each stage of the data path calls only the
stages below it is the import-linter contract "data: one way through" in pyproject.toml, checked by
``make test``.)"""

import ast
from pathlib import Path

import opentrans_hf.data

MAX_FUNCTION_LINES = 80


def test_no_function_of_the_data_package_is_longer_than_one_screen():
    root = Path(opentrans_hf.data.__file__).parent
    files = sorted(root.rglob("*.py"))
    assert any(f.name == "sources.py" for f in files)
    long = []
    for f in files:
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{f.relative_to(root)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"
