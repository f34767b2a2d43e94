"""Imports flow one way (issue 35): no module of the package imports, at any depth and at any place in its body (a
late import inside a function counts), a module that imports it back."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "diffusion_dpo"


def import_graph() -> dict[str, set[str]]:
    """{module: the package's modules it imports}, from the source (nothing is imported)."""
    files = {}
    for file in PACKAGE.rglob("*.py"):
        name = ".".join(("diffusion_dpo", *file.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")
        files[name] = file
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, file in files.items():
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            # the package root only re-exports (the public API); importing it is not a dependency of substance
            graph[name] |= {t for t in targets if t in files and t not in (name, "diffusion_dpo")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles():
    graph = import_graph()
    assert len(graph) > 40 and "diffusion_dpo.training.trainer" in graph["diffusion_dpo.cli"] | {
        t for m in graph["diffusion_dpo.cli"] for t in graph[m]}  # the graph is read, not empty
    assert cycles(graph) == []


def test_production_code_never_imports_a_fixture():
    """The tiny builders live in `testing/`; only the `make-tiny` command (cli) reaches them."""
    graph = import_graph()
    users = {m for m, targets in graph.items() if not m.startswith("diffusion_dpo.testing")
             and any(t.startswith("diffusion_dpo.testing") for t in targets)}
    assert users == {"diffusion_dpo.cli.app"}


def test_no_class_does_several_jobs():
    """A class past ~300 lines is doing several jobs (DESIGN: split by job)."""
    sizes = {f"{file.relative_to(PACKAGE)}:{node.name}": node.end_lineno - node.lineno + 1
             for file in PACKAGE.rglob("*.py") for node in ast.walk(ast.parse(file.read_text()))
             if isinstance(node, ast.ClassDef)}
    assert len(sizes) > 30 and "training/trainer.py:Trainer" in sizes
    assert {name: n for name, n in sizes.items() if n > 300} == {}


def test_the_cache_and_the_step_take_config_sections():
    """The cache, the precomputed reference, the training step and the outputs take the sections they read, never
    the root Config (which only the composition roots, the trainer, its setup and the commands, hold)."""
    for module in ("cache/build.py", "cache/store.py", "cache/identity.py", "cache/reference.py",
                   "training/step.py", "training/loop.py"):
        tree = ast.parse((PACKAGE / module).read_text())
        annotations = {ast.unparse(arg.annotation) for node in ast.walk(tree)
                       if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                       for arg in node.args.args + node.args.kwonlyargs if arg.annotation is not None}
        assert annotations and "Config" not in annotations, module


def test_every_family_has_a_tiny_builder_and_make_tiny_builds_each():
    """A new family in models.loading.FAMILIES needs its tiny builder (testing/tiny.py BUILDERS, keyed by its name):
    make-tiny builds one of each family and the tests train each."""
    import inspect

    from diffusion_dpo.cli import app
    from diffusion_dpo.models import FAMILIES
    from diffusion_dpo.testing.tiny import BUILDERS, KINDS

    assert {f.name for f in FAMILIES} <= set(BUILDERS) and set(KINDS) == set(BUILDERS)
    assert "for family in FAMILIES" in inspect.getsource(app._cmd_make_tiny)
