"""The house plan, enforced: wings import only downward, and no module imports in a circle.

Imports are read from the source (``ast``, nothing executed), including imports inside
functions: a lazy import is still a dependency. The wing order, from the ground up, is
``WINGS``; a module may import its own wing and any wing below it, never one above.
"""

from __future__ import annotations

import ast
import pathlib
from typing import Dict, Iterable, List, Optional, Set, Tuple

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "prompt_t5x"
# From the ground up. Each wing's __init__ docstring says the same in words.
WINGS = ("base", "model", "methods", "parallel", "data", "checkpoints", "inference", "training",
         "bench", "commands")


def module_name(path: pathlib.Path, root: pathlib.Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imported_modules(path: pathlib.Path, root: pathlib.Path, known: Set[str]) -> Set[str]:
    """Every module of ours that ``path`` imports (top level or inside functions)."""
    package = module_name(path, root).rsplit(".", 1)[0]
    found: Set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            # `from pkg import mod` imports pkg.mod when that is a module; else a name of pkg.
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                     for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def import_graph(root: pathlib.Path) -> Dict[str, Set[str]]:
    files = {module_name(p, root): p for p in root.rglob("*.py")}
    known = set(files)
    return {name: imported_modules(path, root, known) - {name} for name, path in files.items()}


def wing_of(module: str) -> Optional[str]:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in WINGS) else None


def upward_imports(graph: Dict[str, Set[str]], wings: Tuple[str, ...] = WINGS
                   ) -> List[Tuple[str, str]]:
    """(importer, imported) pairs where a lower wing imports a higher one."""
    rank = {w: i for i, w in enumerate(wings)}
    bad = []
    for module, deps in graph.items():
        here = wing_of(module)
        for dep in deps:
            there = wing_of(dep)
            if here in rank and there in rank and rank[there] > rank[here]:
                bad.append((module, dep))
    return sorted(bad)


def find_cycle(graph: Dict[str, Set[str]]) -> Optional[List[str]]:
    """One import circle (a list of modules, first == last), or None."""
    WHITE, GREY, BLACK = 0, 1, 2
    colour = {m: WHITE for m in graph}
    stack: List[str] = []

    def visit(m: str) -> Optional[List[str]]:
        colour[m] = GREY
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if d in colour and colour[d] == GREY:
                return stack[stack.index(d):] + [d]
            if d in colour and colour[d] == WHITE:
                found = visit(d)
                if found:
                    return found
        stack.pop()
        colour[m] = BLACK
        return None

    for m in sorted(graph):
        if colour[m] == WHITE:
            found = visit(m)
            if found:
                return found
    return None


def _describe(pairs: Iterable[Tuple[str, str]]) -> str:
    return "\n".join(f"  {a} -> {b}" for a, b in pairs)


def check_only_downward(root: pathlib.Path) -> None:
    bad = upward_imports(import_graph(root))
    assert not bad, "imports from a lower wing into a higher one:\n" + _describe(bad)


def check_no_circles(root: pathlib.Path) -> None:
    cycle = find_cycle(import_graph(root))
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_every_module_lives_in_a_wing():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert top == ["__init__.py", "__main__.py"], top
    for wing in WINGS:
        init = PACKAGE / wing / "__init__.py"
        assert init.is_file(), f"wing {wing} has no __init__.py"
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and "import" in doc, f"{init}: the docstring must say what the wing may import"
    assert {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()} == set(WINGS)


def test_imports_only_go_down():
    check_only_downward(PACKAGE)


def test_no_import_circles():
    check_no_circles(PACKAGE)


def test_the_checks_fail_on_a_bad_import(tmp_path):
    """The checks above can fail: a lazy upward import and a circle in a throwaway package."""
    root = tmp_path / "prompt_t5x"
    files = {
        "__init__.py": "",
        "model/__init__.py": '"""Imports nothing."""',
        "model/t5.py": "def f():\n    from prompt_t5x.training import loop  # upward, lazily\n",
        "training/__init__.py": '"""May import model."""',
        "training/loop.py": "from . import step\n",
        "training/step.py": "import prompt_t5x.training.loop\n",
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    graph = import_graph(root)
    assert upward_imports(graph) == [("prompt_t5x.model.t5", "prompt_t5x.training.loop")]
    assert set(find_cycle(graph)) == {"prompt_t5x.training.loop", "prompt_t5x.training.step"}
    with pytest.raises(AssertionError, match="lower wing into a higher"):
        check_only_downward(root)
    with pytest.raises(AssertionError, match="import circle"):
        check_no_circles(root)
    # Mended, the same package passes both checks.
    (root / "model/t5.py").write_text("X = 1\n")
    (root / "training/step.py").write_text("from prompt_t5x.model import t5\n")
    check_only_downward(root)
    check_no_circles(root)
