"""The package's import structure: lazy public names, torch-free parts, no import cycle, a self-contained runtime.

The import graph is read from the source with `ast`: every `import`/`from ... import` of a tomoe_core
module, at module level and inside functions alike (a function-level import still runs, and a cycle
through one is still a cycle), relative imports resolved against the importing module's package.
"""
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "tomoe_core"


def _run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout


def test_torch_free_modules_import_without_torch():
    out = _run("import sys; import tomoe_core, tomoe_core.infra.jobs, tomoe_core.infra.paths, "
               "tomoe_core.convert.config, tomoe_core.convert.folder, tomoe_core.infra.workspace; "
               "import analysis.catalog, analysis.continuations; print('torch' in sys.modules, "
               "'transformers' in sys.modules)")
    assert out.split() == ["False", "False"]


def test_public_names_load_on_first_use_and_register_the_model_type():
    out = _run("import tomoe_core; f = tomoe_core.load_converted; from transformers import AutoConfig; "
               "print(f.__module__, type(AutoConfig.for_model('tomoe')).__name__, 'load_dense' in dir(tomoe_core))")
    assert out.split() == ["tomoe_core.convert.materialise", "ToMoEConfig", "True"]
    bad = subprocess.run([sys.executable, "-c", "import tomoe_core; tomoe_core.nope"], cwd=ROOT, capture_output=True,
                         text=True)
    assert bad.returncode != 0 and "has no attribute 'nope'" in bad.stderr


# -- the import graph -------------------------------------------------------------------------------
def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the package's modules it imports (anywhere in its body). A `from X import name` whose
    name is a submodule of X counts as importing that submodule; otherwise X itself."""
    modules = {_module_name(p): p for p in package.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        base = name.split(".") if is_package else name.split(".")[:-1]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    anchor = base[:len(base) - (node.level - 1)]
                    source = ".".join(anchor + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in modules:  # `import a.b.c` of a name inside a module
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges.add(target)
        graph[name] = edges
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of `graph`, each sorted."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_relative_and_function_level_imports():
    graph = import_graph()
    assert "tomoe_core.moe.layer" in graph["tomoe_core.moe.modeling"]  # `from .layer import ...`
    assert "tomoe_core.convert.dense" in graph["tomoe_core.cli"]  # inside a function
    assert "tomoe_core.moe.gather_triton" in graph["tomoe_core.moe.gather_kernels"]  # `from . import gather_triton`
    assert strongly_connected({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"], ["c"]]


def test_no_import_cycle_inside_the_package():
    cycles = [c for c in strongly_connected(import_graph()) if len(c) > 1]
    assert not cycles, f"modules that import each other in a circle: {cycles}"


def test_the_exported_runtime_imports_nothing_else_from_the_package():
    outside = {f"{m} -> {t}" for m, targets in import_graph().items() if m.startswith("tomoe_core.moe")
               for t in targets if not t.startswith("tomoe_core.moe")}
    assert not outside, f"tomoe_core/moe/ is copied alone by `export --hub-ready`: {sorted(outside)}"


def test_export_copies_exactly_the_runtime_folder():
    from tomoe_core.workflows.export import runtime_files

    assert runtime_files() == sorted((PACKAGE / "moe").glob("*.py"))


def test_no_module_is_named_like_the_standard_library_or_over_600_lines():
    for path in PACKAGE.rglob("*.py"):
        assert path.stem not in sys.stdlib_module_names or path.stem == "__init__" or path.stem == "__main__", path
        lines = len(path.read_text().splitlines())
        assert lines <= 600, f"{path.relative_to(ROOT)} has {lines} lines"
