"""The suite's own rules: tiers by marker, and no test module importing another."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent
# what makes a test an integration test: another process (the CLI, a server, a script), Ray
OUTSIDE = ("subprocess.", "Popen(", "Process(", "Server(", "ray.init", "make_world(", "run_cli(", "\"--jobs\"")


def _marks(decorators) -> str:
    return " ".join(ast.unparse(d) for d in decorators)


def test_no_test_module_imports_another():
    for f in sorted(TESTS.glob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith("tests.test_"), f"{f.name} imports {node.module}"


def test_tests_that_start_other_processes_are_in_the_integration_tier():
    """The fast tier (`make test-fast`: not integration, not gpu) holds unit tests only."""
    unmarked = []
    for f in sorted(TESTS.glob("test_*.py")):
        src = f.read_text(encoding="utf-8")
        tree = ast.parse(src)
        module_marks = " ".join(ast.unparse(n.value) for n in tree.body if isinstance(n, ast.Assign)
                                and any(getattr(t, "id", "") == "pytestmark" for t in n.targets))
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                body = ast.get_source_segment(src, node)
                marks = module_marks + " " + _marks(node.decorator_list)
                if any(k in body for k in OUTSIDE) and "integration" not in marks and "gpu" not in marks:
                    unmarked.append(f"{f.name}::{node.name}")
    assert not unmarked, unmarked
