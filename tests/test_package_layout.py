"""The direction of dependencies: search_spaces/ and fitness/ build on evosearch/ and never
import each other; only evosearch's CLI, pipeline and metric search put them together."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMBINERS = {"cli.py", "pipeline.py", "metric_search.py"}  # may wire packages together


def imported_packages(path: Path) -> set[str]:
    """Top-level names of every absolute import in ``path``, including
    ``importlib.import_module("...")`` calls with a literal name."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            names.add(node.args[0].value.split(".")[0])
    return names


def _modules(package: str) -> list[Path]:
    files = sorted((ROOT / package).glob("*.py"))
    assert files, f"no modules found in {package}/"
    return files


def test_the_import_parser_sees_every_form(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import fitness.kl\n"
        "from search_spaces import LayerDropSpace\n"
        "from . import sibling\n"
        "def f():\n"
        "    import importlib\n"
        "    return importlib.import_module('ray.util')\n"
    )
    assert imported_packages(probe) == {"fitness", "search_spaces", "importlib", "ray"}


@pytest.mark.parametrize("path", _modules("search_spaces"), ids=lambda p: p.name)
def test_search_spaces_never_import_fitness(path):
    assert "fitness" not in imported_packages(path)


@pytest.mark.parametrize("path", _modules("fitness"), ids=lambda p: p.name)
def test_fitness_never_imports_search_spaces(path):
    assert "search_spaces" not in imported_packages(path)


@pytest.mark.parametrize(
    "path",
    [p for p in _modules("evosearch") if p.name not in COMBINERS],
    ids=lambda p: p.name,
)
def test_evosearch_core_imports_neither(path):
    assert not imported_packages(path) & {"fitness", "search_spaces"}


def test_importing_evosearch_loads_no_optional_heavy_dependency():
    code = (
        "import sys, evosearch, search_spaces, fitness\n"
        "heavy = {'ray', 'lm_eval', 'datasets'} & {m.split('.')[0] for m in sys.modules}\n"
        "print(sorted(heavy))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
