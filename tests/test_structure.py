"""The package's shape: imports flow one way, deferred imports say why, tests write nothing into the repo."""
import ast
from pathlib import Path

import torch

PACKAGE = Path(__file__).resolve().parents[1] / "workbench"


def _imports(path: Path) -> list[tuple[str, ast.AST, bool]]:
    """(imported workbench module, node, inside a function) for every import in one file."""
    tree = ast.parse(path.read_text())
    out = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.ImportFrom) and child.module and child.module.split(".")[0] == "workbench":
                if child.module == "workbench":
                    out.extend((f"workbench.{a.name}", child, in_function) for a in child.names)
                else:
                    out.append((child.module, child, in_function))
            elif isinstance(child, ast.Import):
                out.extend((a.name, child, in_function) for a in child.names if a.name.startswith("workbench."))
            visit(child, inner)

    visit(tree, False)
    return out


def _graph() -> dict[str, set[str]]:
    return {f"workbench.{p.stem}": {m for m, _, _ in _imports(p)} for p in PACKAGE.glob("*.py")}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := dfs(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := dfs(node)):
            return found
    return None


def test_no_import_cycle_among_workbench_modules():
    cycle = _cycle(_graph())
    assert cycle is None, " → ".join(cycle)


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_workbench_import_inside_functions():
    """Imports inside functions only defer heavy third-party libraries, never our own modules (no cycle hiding)."""
    inner = [(p.name, node.lineno) for p in PACKAGE.glob("*.py") for _, node, in_fn in _imports(p) if in_fn]
    assert inner == []


def test_every_deferred_import_says_why():
    lines = []
    for p in PACKAGE.glob("*.py"):
        src = p.read_text().splitlines()
        tree = ast.parse("\n".join(src))
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    if isinstance(node, (ast.Import, ast.ImportFrom)) and "# deferred:" not in src[node.end_lineno - 1]:
                        lines.append(f"{p.name}:{node.lineno}")
    assert lines == []


def test_caches_and_figures_go_where_the_environment_says(tmp_path, monkeypatch):
    """Folders are resolved when used, so redirecting them after import works (no import-time binding)."""
    from workbench.importance import importance_cached
    from workbench.paths import REPO_ROOT, data_cache
    from workbench.testing import tiny_model

    monkeypatch.setenv("WORKBENCH_DATA_CACHE", str(tmp_path / "elsewhere"))
    before = sorted(p.name for p in (REPO_ROOT / "data_cache").iterdir())
    importance_cached(tiny_model("llama", n_layers=2), torch.randint(0, 256, (2, 8)), progress=False)
    assert len(list((tmp_path / "elsewhere" / "importance").glob("*.pt"))) == 1
    assert data_cache("x") == tmp_path / "elsewhere" / "x"
    assert sorted(p.name for p in (REPO_ROOT / "data_cache").iterdir()) == before
