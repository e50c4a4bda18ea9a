"""The import graph of glm flows one way, so each layer can be read (and tested) without the ones above it.

Layers, lowest first (docs/architecture.md draws them): errors and the file layer know nothing of models;
the config; the compute core (attention, kernels, positions, KV cache); the model; the release formats and
presets; the tokenizer; the hub (load, save, convert); the applications (data, generation, training,
parity, benchmarks); the CLI and the package itself. A module may import from its own layer or below,
never above, and no two modules may import each other, however indirectly. Project modules are imported
at the top of a file, never inside a function (outside the CLI, which imports a command's modules
only when that command runs, to start fast)."""
from __future__ import annotations

import ast
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Folder on disk -> package name once installed (setup.cfg package_dir).
PACKAGES = {"glm": "glm", "kernels": "glm.kernels", "tokenizer": "glm.tokenizer"}

LAYERS: list[tuple[str, ...]] = [
    ("glm.errors", "glm.files", "glm.devices", "glm.checkpoint", "glm.tuning"),
    ("glm.config",),
    ("glm.kernels", "glm.kernels.ops", "glm.attention", "glm.kv_cache", "glm.positions"),
    ("glm.model", "glm.lora", "glm.ptuning", "glm.quant"),
    ("glm.formats", "glm.formats.*", "glm.presets"),
    ("glm.tokenizer", "glm.tokenizer.*"),
    ("glm.hub",),
    ("glm.data", "glm.corpus", "glm.generate", "glm.parity", "glm.train", "glm.run_folder", "glm.demo",
     "glm.bench", "glm.sft", "glm.toy_tasks", "glm.cloze", "glm.finetune"),
    ("glm.cli", "glm.__main__", "glm"),
]
# Modules whose function-level imports of project modules are intended (see the module docstring).
LAZY_IMPORTS_ALLOWED = {"glm.cli"}


def modules() -> dict[str, pathlib.Path]:
    out = {}
    for folder, package in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = [p for p in path.relative_to(ROOT / folder).with_suffix("").parts if p != "__init__"]
            out[".".join([package, *parts])] = path
    return out


def layer_of(name: str) -> int:
    for rank, members in enumerate(LAYERS):
        for m in members:
            if name == m or (m.endswith(".*") and name.startswith(m[:-1])):
                return rank
    raise AssertionError(f"module {name} is in no layer of tests/test_layering.py: add it to LAYERS")


def imports(name: str, path: pathlib.Path, known: set[str]) -> list[tuple[str, int, bool]]:
    """(imported project module, line, inside a function) for each import statement of ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    is_package = path.name == "__init__.py"
    in_function: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            in_function.update(id(n) for n in ast.walk(node) if n is not node)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # `from glm import kernels` imports the submodule glm.kernels, not (only) the package.
            subs = [f"{module}.{a.name}" for a in node.names if f"{module}.{a.name}" in known]
            targets = subs or [module]
        else:
            continue
        for t in targets:
            if t in known and t != name:
                found.append((t, node.lineno, id(node) in in_function))
    return found


def graph() -> dict[str, list[tuple[str, int, bool]]]:
    mods = modules()
    return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def test_every_module_has_a_layer():
    for name in modules():
        layer_of(name)


def test_imports_flow_down():
    upward = [f"{name}:{line} imports {target} (layer {layer_of(target)} > {layer_of(name)})"
              for name, edges in graph().items() for target, line, _ in edges
              if layer_of(target) > layer_of(name)]
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


def test_no_import_cycle():
    g = {name: sorted({t for t, _, _ in edges}) for name, edges in graph().items()}
    # Tarjan's strongly connected components: any component of two or more modules is a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in g:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_no_function_level_project_imports():
    lazy = [f"{name}:{line} imports {target} inside a function"
            for name, edges in graph().items() if name not in LAZY_IMPORTS_ALLOWED
            for target, line, inside in edges if inside]
    assert not lazy, "project modules imported inside functions (import them at the top):\n" + "\n".join(lazy)


@pytest.mark.parametrize("bad", ["glm.model imports glm.hub", "glm.errors imports glm.config"])
def test_the_check_catches_an_upward_import(bad):
    low, high = bad.split(" imports ")
    assert layer_of(high) > layer_of(low)


def test_no_benchmark_script_shadows_a_standard_library_module():
    # `python benchmarks/x.py` (and glm bench) puts benchmarks/ first on sys.path, so a script named like a
    # standard module (tokenize.py) would be imported by the interpreter itself in place of that module.
    root = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"
    names = {p.stem for p in root.glob("*.py")}
    assert not names & set(sys.stdlib_module_names)
