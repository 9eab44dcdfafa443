"""The imports of the repository's own modules (every module under v2/ and the top-level *.py),
read with `ast`, module-level and inside functions alike (issue 25, "What must be shown": no
import circle in v2/, a test that walks the imports):

- no import circle, except known ones, each named below with the issue that removes it (none
  now); once that issue removes it, this test fails until it is taken off the list;
- no private name (`_name`) imported from another of the repository's modules (`from v2.x import
  _name`, or from a top-level module).
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# circles allowed for now, each with the issue that removes it: {frozenset(modules): issue title}
KNOWN_CIRCLES: dict[frozenset[str], str] = {}


def module_name(path: Path, root: Path) -> str:
    """v2/runs/spec.py -> v2.runs.spec, v2/runs/__init__.py -> v2.runs, token_skip_eval.py ->
    token_skip_eval."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def own_modules(root: Path, package: str = "v2") -> dict[str, Path]:
    """{name: path} of every module of `package` (its folder under root) and every *.py at root."""
    files = [*sorted((root / package).rglob("*.py")), *sorted(root.glob("*.py"))]
    return {module_name(p, root): p for p in files if "__pycache__" not in p.parts}


def imports(path: Path, name: str, modules: dict[str, Path]) -> list[tuple[str, list[str]]]:
    """(module imported, names taken from it) for each import in the file, anywhere in it, of
    a module in `modules`: `from v2 import x` is v2.x where v2.x is a module; importing
    v2.a.b imports its packages v2 and v2.a too (their __init__)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[tuple[str, list[str]]] = []

    def add(target: str, names: list[str]) -> None:
        parts = target.split(".")
        for i in range(1, len(parts)):  # the packages on the way
            if (parent := ".".join(parts[:i])) in modules:
                found.append((parent, []))
        if target in modules:
            found.append((target, names))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, [])
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the package, up level - 1
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            names = [a.name for a in node.names]
            submodules = [n for n in names if f"{target}.{n}" in modules]
            add(target, [n for n in names if n not in submodules])
            for n in submodules:
                add(f"{target}.{n}", [])
    return found


def import_graph(root: Path, package: str = "v2") -> dict[str, set[str]]:
    modules = own_modules(root, package)
    return {
        name: {t for t, _ in imports(path, name, modules) if t != name}
        for name, path in modules.items()
    }


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each import circle (a strongly connected set of more than one module, Tarjan's), as one
    closed path through it (a -> b -> ... -> a), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def visit(v: str) -> None:  # the graphs here are small: recursion is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(closed_path(graph, g) for g in groups)


def closed_path(graph: dict[str, set[str]], group: set[str]) -> list[str]:
    """A shortest circle through the group's first module (breadth first, inside the group)."""
    start = min(group)
    paths = {start: [start]}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph[v] & group):
            if w == start:
                return [*paths[v], start]
            if w not in paths:
                paths[w] = [*paths[v], w]
                queue.append(w)
    raise AssertionError(f"no circle through {start} in {sorted(group)}")


def private_imports(root: Path, package: str = "v2") -> list[str]:
    """'<module>: from <other> import <_name>' for each private name taken from one of the
    repository's own modules (`package` and the top-level modules) by another."""
    modules = own_modules(root, package)
    bad = []
    for name, path in modules.items():
        for target, names in imports(path, name, modules):
            if target == name or target not in modules:  # another module of the repository
                continue
            for n in names:
                if n.startswith("_") and not n.startswith("__"):
                    bad.append(f"{name}: from {target} import {n}")
    return bad


def check_circles(found: list[list[str]], known: dict[frozenset, str]) -> list[str]:
    """What is wrong: a circle not in `known`, or a known one that is gone."""
    groups = {frozenset(c): c for c in found}
    problems = [f"import circle: {' -> '.join(c)}" for g, c in groups.items() if g not in known]
    problems += [
        f"the known circle {' <-> '.join(sorted(g))} is gone (removed by {issue!r}): take it off "
        "KNOWN_CIRCLES in tests/test_imports.py, so that it cannot come back"
        for g, issue in known.items()
        if g not in groups
    ]
    return problems


def test_no_import_circle_but_the_known_one():
    found = circles(import_graph(REPO))
    print("import circles in v2/ and the top-level modules:")
    for c in found:
        print("  " + " -> ".join(c))
    problems = check_circles(found, KNOWN_CIRCLES)
    assert not problems, "\n".join(problems)


def test_the_experiment_wing_has_no_circle():
    """Named for the reader: the wing's modules are in no circle at all (the test above covers
    them too; this one says which they are)."""
    graph = import_graph(REPO)
    wing = {
        "v2.experiments",
        "v2.eval",
        "v2.lm_adapter",
        "v2.record",
        "v2.report",
        "v2.tune",
        "v2.plotting",
        "v2.options",
        "v2.policies",
    } | {m for m in graph if m == "v2.runs" or m.startswith("v2.runs.")}
    parts = {"spec", "state", "sweep", "backend", "harness", "direct", "local", "slurm", "cli"}
    assert {"v2.runs"} | {f"v2.runs.{m}" for m in parts} <= wing
    touching = [c for c in circles(graph) if wing & set(c)]
    assert not touching, "\n".join(" -> ".join(c) for c in touching)
    # the backends and the state do not import the command that runs them
    for m in ("harness", "direct", "local", "slurm", "state", "spec", "sweep"):
        assert not {"v2.experiments", "v2.runs.cli"} & set(graph[f"v2.runs.{m}"]), m


def test_no_private_name_across_modules():
    bad = private_imports(REPO)
    assert not bad, "private names imported across modules:\n" + "\n".join(bad)


def test_the_walk_finds_what_it_should(tmp_path):
    """The checks themselves, on a made-up tree: circles through function-level imports and
    `from pkg import module`, a relative import, a private name, and a known circle gone."""
    files = {
        "pkg/__init__.py": "",
        "pkg/a.py": "from pkg.b import thing\n",
        "pkg/b.py": "def f():\n    from pkg import c\n",
        "pkg/c.py": "import pkg.a\nfrom pkg.d import _hidden\n",
        "pkg/d.py": "from . import e\n_hidden = 1\n",
        "pkg/e.py": "from .d import _hidden\n",
        "top.py": "from pkg import a\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    found = circles(import_graph(tmp_path, "pkg"))
    assert found == [["pkg.a", "pkg.b", "pkg.c", "pkg.a"], ["pkg.d", "pkg.e", "pkg.d"]]
    problems = check_circles(found, {frozenset({"pkg.d", "pkg.e"}): "issue", frozenset("xy"): "z"})
    assert problems[0] == "import circle: pkg.a -> pkg.b -> pkg.c -> pkg.a"
    assert "is gone" in problems[1] and "KNOWN_CIRCLES" in problems[1]
    assert len(problems) == 2
    assert private_imports(tmp_path, "pkg") == [
        "pkg.c: from pkg.d import _hidden",
        "pkg.e: from pkg.d import _hidden",
    ]
