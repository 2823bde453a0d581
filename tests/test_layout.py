"""The package's shape: imports point one way (no cycle, imports inside functions and type-only
imports counted), and modules stay small enough to read in one sitting."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "blockrecurrent"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The package modules that `path` imports anywhere in its body (a `from pkg import name`
    counts as importing pkg.name when that is a module, else pkg)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [(mod, [a.name for a in node.names])]
        else:
            continue
        for mod, names in targets:
            subs = [f"{mod}.{n}" for n in names if f"{mod}.{n}" in modules]
            if subs:
                found.update(subs)
            elif mod in modules:
                found.add(mod)
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imports_of(p, modules) for p in paths}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_walker_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# Lower layers first: a module may import its own layer and those before it, never a later one.
LAYERS = ("files", "errors", "memory", "model", "data", "generate", "train", "evaluate", "bench",
          "hf", "serve", "report", "cli")
# model.generate() is a convenience that hands over to generate/, which knows the model by its
# config and does not import the model's module (so there is no cycle).
UPWARD = {("blockrecurrent.model.transformer", "blockrecurrent.generate.generation")}


def layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 else len(LAYERS)  # the package's __init__


def test_imports_point_down():
    up = [f"{a} -> {b}" for a, deps in import_graph().items() for b in deps
          if layer(b) > layer(a) and (a, b) not in UPWARD]
    assert not up, "imports of a higher layer: " + ", ".join(sorted(up))



# The redesign issue's done-criterion: every module under ~400 lines, every function under ~60
# lines or with its reason in a comment line right above it (above its decorators), starting
# "# Over 60 lines:".
MODULE_LINES, FUNCTION_LINES = 400, 60

def test_modules_and_functions_stay_small():
    long_modules, long_functions = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = path.relative_to(PACKAGE.parent).as_posix()
        lines = path.read_text().splitlines()
        if len(lines) > MODULE_LINES:
            long_modules.append(f"{name} ({len(lines)} lines)")
        for node in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            size = node.end_lineno - node.lineno + 1
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            reason = lines[first - 2].strip() if first >= 2 else ""
            if size > FUNCTION_LINES and not reason.startswith("# Over 60 lines:"):
                long_functions.append(f"{name}:{node.lineno} {node.name} ({size} lines)")
    assert not long_modules, f"modules over {MODULE_LINES} lines: {', '.join(long_modules)}"
    assert not long_functions, ("functions over 60 lines without a '# Over 60 lines: <reason>' "
                                "line above them: " + ", ".join(long_functions))
