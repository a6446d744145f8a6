"""The package's two layers: the math in ``vdm_jax`` never imports the runner."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "vdm_jax"


def _imported_modules(path: pathlib.Path) -> set[str]:
    """Every module an ``import`` or ``from ... import`` statement in ``path`` names."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_math_modules_never_import_the_runner():
    math_modules = sorted(PACKAGE.glob("*.py"))
    assert len(math_modules) >= 10, "the math layer's modules were not found"
    offenders = {
        path.name: sorted(n for n in _imported_modules(path) if n.startswith("vdm_jax.runner"))
        for path in math_modules
    }
    assert not {k: v for k, v in offenders.items() if v}


def test_the_check_sees_a_runner_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from vdm_jax.runner import train\nimport vdm_jax.runner.data\n")
    assert {"vdm_jax.runner.train", "vdm_jax.runner.data"} <= _imported_modules(bad)
