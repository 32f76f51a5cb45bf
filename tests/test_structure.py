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


def _module(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    return ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)


def _files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _graph() -> dict[str, set[str]]:
    return {_module(p): {m for m, _, _ in _imports(p)} for p in _files() if p.name != "__init__.py"}


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
    inner = [(p.name, node.lineno) for p in _files() for _, node, in_fn in _imports(p) if in_fn]
    assert inner == []


def test_every_deferred_import_says_why():
    lines = []
    for p in _files():
        src = p.read_text().splitlines()
        tree = ast.parse("\n".join(src))
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    if isinstance(node, (ast.Import, ast.ImportFrom)) and "# deferred:" not in src[node.end_lineno - 1]:
                        lines.append(f"{p.name}:{node.lineno}")
    assert lines == []


def test_stages_import_only_earlier_stages():
    """Stage packages follow the data flow: a module imports only its own stage and the stages before it."""
    from workbench import STAGES

    assert sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()) == sorted(STAGES)
    wrong = []
    for p in _files():
        stage = p.relative_to(PACKAGE).parts[0]
        if stage not in STAGES:
            continue
        for module, node, _ in _imports(p):
            other = module.split(".")[1] if module.count(".") else None
            if other in STAGES and STAGES.index(other) > STAGES.index(stage):
                wrong.append(f"{_module(p)} imports {module} (line {node.lineno})")
    assert wrong == []


def test_flat_modules_are_only_the_front_door():
    assert sorted(p.name for p in PACKAGE.glob("*.py")) == ["__init__.py", "__main__.py"]


def test_every_stage_package_exports_what_its_modules_define():
    """Each stage's `__all__` names resolve, and every public name a stage module defines is exported."""
    import importlib

    from workbench import STAGES

    for stage in STAGES:
        pkg = importlib.import_module(f"workbench.{stage}")
        assert all(hasattr(pkg, n) for n in pkg.__all__), stage
        assert len(set(pkg.__all__)) == len(pkg.__all__), stage


def test_front_door_names_resolve_and_come_from_stages():
    """The front door re-exports what the stages export (no name of its own but the stage list)."""
    import importlib

    import workbench

    assert len(set(workbench.__all__)) == len(workbench.__all__)
    exported = {n for stage in workbench.STAGES for n in importlib.import_module(f"workbench.{stage}").__all__}
    namespaces = {"plots", "llamacpp"}  # figure and llama.cpp modules, used as plots.export(...), llamacpp.compare(...)
    assert set(workbench.__all__) - exported - namespaces == {"STAGES"}


def test_notebooks_import_only_the_front_door():
    """Notebooks are glue over the front door: `import workbench as wb` or `from workbench import ...`."""
    bad = []
    for nb in sorted((PACKAGE.parent / "notebooks").glob("*.py")):
        for node in ast.walk(ast.parse(nb.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("workbench."):
                bad.append(f"{nb.name}:{node.lineno} from {node.module}")
            if isinstance(node, ast.Import):
                bad += [f"{nb.name}:{node.lineno} import {a.name}" for a in node.names if a.name.startswith("workbench.")]
    assert bad == []


def test_caches_and_figures_go_where_the_environment_says(tmp_path, monkeypatch):
    """Folders are resolved when used, so redirecting them after import works (no import-time binding)."""
    from workbench.core.paths import REPO_ROOT, data_cache
    from workbench.core.testing import tiny_model
    from workbench.scoring.importance import importance_cached

    monkeypatch.setenv("WORKBENCH_DATA_CACHE", str(tmp_path / "elsewhere"))
    before = sorted(p.name for p in (REPO_ROOT / "data_cache").iterdir())
    importance_cached(tiny_model("llama", n_layers=2), torch.randint(0, 256, (2, 8)), progress=False)
    assert len(list((tmp_path / "elsewhere" / "importance").glob("*.pt"))) == 1
    assert data_cache("x") == tmp_path / "elsewhere" / "x"
    assert sorted(p.name for p in (REPO_ROOT / "data_cache").iterdir()) == before


def test_the_architecture_page_maps_every_stage_module_cache_kind_and_command():
    """docs/ARCHITECTURE.md is the only module map: it fails here when a stage package, a module, a cache
    kind or a CLI command is missing from it."""
    import re

    from workbench import STAGES
    from workbench.core.cache import CACHE_KINDS
    from workbench.runs import cli

    page = (PACKAGE.parent / "docs" / "ARCHITECTURE.md").read_text()
    rows: dict[str, set[str]] = {}
    stage = None
    table = page.split("| stage | module | concern |")[1].split("\n\n")[0]  # the module map
    for line in table.splitlines():
        cells = [c.strip() for c in line.split("|")[1:-1]] if line.startswith("| ") else []
        if len(cells) == 3 and cells[1].startswith("`"):
            stage = cells[0].strip("`") or stage
            rows.setdefault(stage, set()).update(re.findall(r"`(\w+)`", cells[1]))
    for s in STAGES:
        modules = {p.stem for p in (PACKAGE / s).glob("*.py") if p.stem != "__init__"}
        assert modules <= rows.get(s, set()), f"{s}: {sorted(modules - rows.get(s, set()))} not in the map"
    assert set(rows) == set(STAGES)
    cache_section = page.split("### Cache kinds")[1].split("###")[0]
    assert all(f"`{k}`" in cache_section for k in CACHE_KINDS), [k for k in CACHE_KINDS if f"`{k}`" not in cache_section]
    commands = re.findall(r"^    workbench ([a-z-]+)", cli.__doc__, re.M)
    assert commands and all(f"`workbench {c}`" in page for c in commands), commands


def test_modules_the_docs_name_exist():
    """Every `workbench.x.y` the README and the architecture page name is a module or an attribute of one."""
    import importlib
    import re

    missing = []
    for doc in ("README.md", "docs/ARCHITECTURE.md"):
        text = (PACKAGE.parent / doc).read_text()
        for dotted in sorted(set(re.findall(r"`(workbench(?:\.\w+)+)", text))):
            parts = dotted.split(".")
            for cut in range(len(parts), 0, -1):
                try:
                    obj = importlib.import_module(".".join(parts[:cut]))
                except ImportError:
                    continue
                for attr in parts[cut:]:
                    obj = getattr(obj, attr, None)
                if obj is None:
                    missing.append(f"{doc}: {dotted}")
                break
    assert missing == []


def test_test_folders_mirror_the_stage_packages():
    from workbench import STAGES

    folders = {p.name for p in (PACKAGE.parent / "tests").iterdir() if p.is_dir() and not p.name.startswith((".", "_"))}
    assert folders <= set(STAGES), sorted(folders - set(STAGES))


def test_every_module_over_400_lines_is_named_on_the_architecture_page():
    page = (PACKAGE.parent / "docs" / "ARCHITECTURE.md").read_text()
    long = [str(p.relative_to(PACKAGE)) for p in _files() if len(p.read_text().splitlines()) > 400]
    assert [m for m in long if f"`{m}`" not in page] == []


def test_every_choice_check_goes_through_the_registry_helper():
    """"x=v is not allowed; allowed: [...]" and "is not registered" are written by `core.registry` only (one
    message, with the closest allowed value), never by hand."""
    import re

    hand = [f"{p.relative_to(PACKAGE)}:{i}" for p in _files() if p.name != "registry.py"
            for i, line in enumerate(p.read_text().splitlines(), 1)
            if re.search(r"is not (allowed|registered)[;:]", line)]
    assert hand == []
