"""The import graph of rexfast's layers (docs: the design notes' "Layers" table) points down
only and has no circle. Every ``import`` in every ``rexfast/**/*.py`` counts, also those inside
functions (a lazy import is still a dependency), read with ``ast``: nothing is imported here.

    cli  →  serve, export, tensorrt  →  engine  →  data, metrics  →  models  →  ops  →  native (rexfast._C)

The command line sits with the package face (``rexfast/__init__.py``: ``rexfast info`` shows
``rexfast.info()``) above everything; nothing else imports from the face. ``io`` (atomic
writes, safe reading) and ``_version`` sit under every layer.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "rexfast"

# unit -> layer height; a unit may import units of its own height or lower, never higher
LAYERS = {
    "face": 6, "cli": 6, "__main__": 6,
    "serve": 5, "export": 5, "tensorrt": 5,
    "engine": 4,
    "data": 3, "metrics": 3,
    "models": 2,
    "ops": 1,
    "native": 0, "io": 0, "_version": 0,
}


def _unit(module: str) -> str:
    """The layer unit of a dotted module name inside rexfast ("rexfast.engine.trainer" -> "engine")."""
    parts = module.split(".")
    if len(parts) == 1:
        return "face"
    return "native" if parts[1] == "_C" else parts[1]


def _module_of(path: Path, root: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, dotted rexfast module) for every import of rexfast code in ``path``."""
    module = _module_of(path, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == root.name]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != root.name:
                continue
            for alias in node.names:  # `from rexfast import ops` imports the subpackage, not the face
                sub = f"{target}.{alias.name}"
                is_module = (root.parent / Path(*sub.split("."))).with_suffix(".py").is_file() or \
                    (root.parent / Path(*sub.split("."))).is_dir() or sub == f"{root.name}._C"
                found.append((node.lineno, sub if is_module else target))
    return found


def layer_problems(root: Path = ROOT) -> list[str]:
    """Every import that points up a layer or into a unit not in the table, and every circle
    between units, as one line each (empty when the graph is sound)."""
    problems, edges = [], {}
    for path in sorted(root.rglob("*.py")):
        here = _unit(_module_of(path, root))
        if here not in LAYERS:
            problems.append(f"{path.relative_to(root.parent)}: unit {here!r} is in no layer (add it to LAYERS)")
            continue
        for line, target in _imports(path, root):
            there = _unit(target)
            if there not in LAYERS:
                problems.append(f"{path.relative_to(root.parent)}:{line}: imports {target} (unit {there!r}, no layer)")
            elif LAYERS[there] > LAYERS[here]:
                problems.append(f"{path.relative_to(root.parent)}:{line}: {here} imports {target} from the higher "
                                f"layer {there}")
            elif there != here:
                edges.setdefault(here, set()).add(there)
    problems += [f"circle between units: {' -> '.join(c)}" for c in _circles(edges)]
    return problems


def _circles(edges: dict[str, set]) -> list[list[str]]:
    """One circle through each unit that lies on one (depth-first search)."""
    circles, done = [], set()

    def visit(node, path):
        if node in path:
            circles.append(path[path.index(node):] + [node])
            return
        if node in done:
            return
        for nxt in sorted(edges.get(node, ())):
            visit(nxt, path + [node])
        done.add(node)

    for start in sorted(edges):
        visit(start, [])
    return circles


def test_imports_point_down_the_layers_and_make_no_circle():
    problems = layer_problems()
    assert not problems, "\n".join(problems)


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "rexfast"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.mark.parametrize("files, expected", [
    ({"__init__.py": "", "models/__init__.py": "", "models/a.py": "def f():\n    from ..engine import x\n",
      "engine/__init__.py": "", "engine/x.py": ""}, "models imports rexfast.engine.x from the higher layer engine"),
    ({"__init__.py": "", "models/__init__.py": "", "models/a.py": "from .. import __version__\n"},
     "models imports rexfast from the higher layer face"),
    ({"__init__.py": "", "data/__init__.py": "from rexfast.metrics import m\n", "metrics.py": "import rexfast.data\n"},
     "circle between units: data -> metrics -> data"),
    ({"__init__.py": "", "ops/__init__.py": "", "ops/op.py": "from rexfast import _C\nfrom ..io import w\n",
      "io.py": "", "models/__init__.py": "from ..ops import op\nfrom rexfast import ops\n"}, None),
])
def test_the_check_finds_an_upward_import_and_a_circle(tmp_path, files, expected):
    problems = layer_problems(_tree(tmp_path, files))
    if expected is None:
        assert problems == []
    else:
        assert any(expected in p for p in problems), problems
