"""The package layout: imports run one way (no loops), lower layers never import higher ones, and module headers
show every dependency (no function-local project imports)."""
import ast
import os
import subprocess
import sys

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "exo2ego_jax")

# What each part may not import (the README's package map). `errors`/`constants` import nothing of ours.
FORBIDDEN = {
    "exo2ego_jax.errors": ("exo2ego_jax",),
    "exo2ego_jax.constants": ("exo2ego_jax",),
    "exo2ego_jax.models": ("exo2ego_jax.data", "exo2ego_jax.train", "exo2ego_jax.serve", "exo2ego_jax.eval",
                           "exo2ego_jax.convert", "exo2ego_jax.export", "exo2ego_jax.bench",
                           "exo2ego_jax.checkpoints", "exo2ego_jax.losses"),
    "exo2ego_jax.data": ("exo2ego_jax.models", "exo2ego_jax.train", "exo2ego_jax.serve", "exo2ego_jax.eval",
                         "exo2ego_jax.convert", "exo2ego_jax.export", "exo2ego_jax.checkpoints"),
    "exo2ego_jax.checkpoints": ("exo2ego_jax.train", "exo2ego_jax.serve", "exo2ego_jax.eval", "exo2ego_jax.convert",
                                "exo2ego_jax.export", "exo2ego_jax.data"),
    "exo2ego_jax.convert": ("exo2ego_jax.train", "exo2ego_jax.serve", "exo2ego_jax.eval", "exo2ego_jax.data"),
    "exo2ego_jax.train": ("exo2ego_jax.serve", "exo2ego_jax.eval", "exo2ego_jax.export", "exo2ego_jax.convert"),
    "exo2ego_jax.serve": ("exo2ego_jax.train", "exo2ego_jax.eval", "exo2ego_jax.export", "exo2ego_jax.convert"),
    "exo2ego_jax.eval": ("exo2ego_jax.train", "exo2ego_jax.export", "exo2ego_jax.convert"),
    "exo2ego_jax.export": ("exo2ego_jax.train", "exo2ego_jax.serve", "exo2ego_jax.eval"),
}
LAZY_ALLOWED = {"exo2ego_jax"}  # the package root resolves `load_pretrained` lazily (no JAX on `import exo2ego_jax`)


def module_names() -> dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, f), os.path.dirname(PACKAGE))[:-3].replace(os.sep, ".")
                out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(dirpath, f)
    return out


def project_imports(path: str, modules: dict) -> list[tuple[str, bool]]:
    """(imported project module, at module level?) for every import in the file."""
    tree = ast.parse(open(path).read())
    top_level = {id(n) for n in tree.body} | {id(n) for node in tree.body if isinstance(node, (ast.If, ast.Try))
                                              for n in ast.walk(node)}
    out = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                     for a in node.names]
        for name in names:
            if name == "exo2ego_jax" or name.startswith("exo2ego_jax."):
                out.append((name, id(node) in top_level))
    return out


@pytest.fixture(scope="module")
def graph():
    modules = module_names()
    return {m: project_imports(p, modules) for m, p in modules.items()}


def test_no_import_cycles(graph):
    edges = {m: {t for t, _ in imports if t in graph and t != m} for m, imports in graph.items()}
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
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
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    assert not cycles, f"modules that import each other (directly or through others): {cycles}"


def test_lower_layers_do_not_import_higher_ones(graph):
    bad = []
    for module, imports in graph.items():
        for part, forbidden in FORBIDDEN.items():
            if module == part or module.startswith(part + "."):
                bad += [f"{module} -> {t}" for t, _ in imports
                        if any(t == f or t.startswith(f + ".") for f in forbidden) and not t.startswith(part)]
    assert not bad, bad


def test_nothing_in_the_package_imports_the_study(graph):
    """The study drives the launch scripts and scores their exports: it sits on top of everything."""
    bad = [f"{m} -> {t}" for m, imports in graph.items() if not m.startswith("exo2ego_jax.study")
           for t, _ in imports if t.startswith("exo2ego_jax.study")]
    assert not bad, bad


def test_project_imports_sit_in_module_headers(graph):
    local = [f"{m} imports {t} inside a function" for m, imports in graph.items() if m not in LAZY_ALLOWED
             for t, top in imports if not top]
    assert not local, local


def test_ruff_passes():
    """The linter configuration (ruff.toml) holds for the whole repository."""
    root = os.path.dirname(PACKAGE)
    result = subprocess.run([sys.executable, "-m", "ruff", "check", root], capture_output=True, text=True, cwd=root)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-1000:]
