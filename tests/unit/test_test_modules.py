"""Test modules do not import each other: what tests share lives in tests/helpers.py,
tests/<dir>/helpers.py (or another module not named test_*) or a conftest fixture, so that
a test module can be moved, renamed or run alone without pulling in another's tests."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def dotted_name(path: Path) -> str:
    return ".".join(("tests", *path.relative_to(TESTS).with_suffix("").parts))


def imported_modules(path: Path) -> set[str]:
    """Every module an import statement of `path` names (anywhere in it), absolute."""
    package = dotted_name(path).rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*parent, base] if base else parent)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import test_x`
    return found


def test_no_test_module_imports_another():
    modules = sorted(TESTS.rglob("test_*.py"))
    assert len(modules) > 40  # the scan sees the suite
    names = {dotted_name(p) for p in modules}
    offenders = {
        f"{p.relative_to(TESTS.parent)} imports {m}"
        for p in modules
        for m in imported_modules(p)
        if m in names and m != dotted_name(p)
    }
    assert not offenders, "move what is shared to a helpers module or a fixture:\n" + "\n".join(
        sorted(offenders)
    )


def test_the_scan_finds_each_form_of_import(tmp_path, monkeypatch):
    import tests.unit.test_test_modules as me

    tree = tmp_path / "tests"
    (tree / "unit").mkdir(parents=True)
    monkeypatch.setattr(me, "TESTS", tree)
    forms = {
        "from tests.unit.test_a import x": "tests.unit.test_a",
        "from tests.unit import test_a": "tests.unit.test_a",
        "import tests.unit.test_a": "tests.unit.test_a",
        "from . import test_a": "tests.unit.test_a",
        "from .test_a import x": "tests.unit.test_a",
        "from ..e2e.test_b import y": "tests.e2e.test_b",
        "def f():\n    from tests.unit.test_a import x": "tests.unit.test_a",
    }
    for code, module in forms.items():
        path = tree / "unit" / "test_z.py"
        path.write_text(code + "\n")
        assert module in imported_modules(path), code


def test_benchmarks_and_dev_tooling_import_no_test_module():
    """A benchmark that borrowed from a test module broke when the test's helpers moved."""
    names = {dotted_name(p) for p in TESTS.rglob("test_*.py")}
    root = TESTS.parent
    offenders = {
        f"{p.relative_to(root)} imports {node.module}"
        for p in [*root.glob("benchmarks/*.py"), *root.glob("devtools/**/*.py")]
        for node in ast.walk(ast.parse(p.read_text(), str(p)))
        if isinstance(node, ast.ImportFrom) and node.module in names
    }
    assert not offenders, "\n".join(sorted(offenders))
