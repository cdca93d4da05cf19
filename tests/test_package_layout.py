"""The direction of dependencies: search_spaces/ and fitness/ build on evosearch/ and never
import each other, and evosearch/ imports neither (they register themselves through entry
points). No module of the three packages imports a module that imports it back."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


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
    files = sorted((ROOT / package).rglob("*.py"))
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


@pytest.mark.parametrize("path", _modules("evosearch"), ids=lambda p: p.name)
def test_evosearch_imports_neither(path):
    assert not imported_packages(path) & {"fitness", "search_spaces"}
    # nor through a string (importlib, load_object): they are found through entry points
    assert not re.search(r"[\"'](search_spaces|fitness)[.:]", path.read_text()), path


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The project modules ``path`` imports anywhere in it (``from pkg import mod`` counts as
    importing ``pkg.mod`` when that is a module, else ``pkg``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in known:
            subs = {f"{node.module}.{a.name}" for a in node.names} & known
            out |= subs or {node.module}
    return out


def test_no_module_imports_a_module_that_imports_it_back():
    paths = [p for pkg in ("evosearch", "search_spaces", "fitness") for p in _modules(pkg)]
    known = {_module_name(p) for p in paths}
    graph = {_module_name(p): imported_modules(p, known) for p in paths}
    packages = {n for n in known if (ROOT / n.replace(".", "/") / "__init__.py").is_file()}

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            node = todo.pop()
            for nxt in graph.get(node, ()) - packages:  # a package's __init__ only re-exports
                if nxt == goal:
                    return True
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return False

    cycles = sorted(
        {" <-> ".join(sorted((a, b))) for a in graph for b in graph[a] - packages if reaches(b, a)}
    )
    assert not cycles, cycles


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
