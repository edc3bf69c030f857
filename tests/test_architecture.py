"""The import graph flows one way (docs/architecture.md): no cycles, the spec a leaf, the CLI the root.

The graph is read with ast from every module of the package, lazy (function-level) imports and
TYPE_CHECKING imports included, so a cycle hidden inside a function body fails here too. Then
every module is imported on its own in one fresh interpreter, which catches the cycles Python
only trips over at run time (an `ImportError: cannot import name ... partially initialized`).
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

PACKAGE = "shardyard"
ROOT = Path(__file__).resolve().parents[1]
CLI = f"{PACKAGE}.cli"
# The layers of docs/architecture.md's package map: a part imports only parts of lower layers.
LAYERS = {
    "platform": 0,  # the spec: errors, schema, spec, specdoc
    "envvars": 0,  # environment-variable names
    "kernels": 1,
    "data": 1,
    "tracking": 1,
    "cluster": 1,
    "models": 2,
    "comm": 3,
    "optim": 3,
    "interop": 3,
    "runtime": 4,
    "cli": 5,
    "root": 0,  # shardyard/__init__.py: imports nothing
}


def package_modules() -> dict[str, Path]:
    modules = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = path
    return modules


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the package modules it imports. `from a.b import c` counts as importing a.b.c
    when that is a module, else a.b (importing a package's own __init__ is an edge too: a child
    that takes names from its parent package closes a cycle when the parent imports the child)."""

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                resolved = resolve(target) if target.startswith(PACKAGE) else None
                if resolved and resolved != module:
                    graph[module].add(resolved)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


GRAPH = import_graph(package_modules())


def test_no_import_cycles() -> None:
    assert cycles(GRAPH) == []


def test_the_cycle_check_sees_lazy_imports() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    # the CLI's commands import runtime modules inside functions; the graph still sees them
    assert f"{PACKAGE}.runtime.entry" in GRAPH[f"{CLI}.job_commands"]


def part(module: str) -> str:
    """The part of the package map a module belongs to: its subpackage (or the root package)."""
    return module.split(".")[1] if "." in module else "root"


def test_spec_is_a_leaf() -> None:
    for module, targets in GRAPH.items():
        if part(module) == "platform":
            others = sorted(t for t in targets if part(t) != "platform")
            assert not others, f"{module} imports {others}: the spec must import nothing else of {PACKAGE}"


def test_nothing_imports_the_cli() -> None:
    importers = sorted(m for m, targets in GRAPH.items() if part(m) != "cli" and any(part(t) == "cli" for t in targets))
    assert importers == [], f"{importers} import the CLI, which is the root of the graph"


def test_parts_import_only_lower_layers() -> None:
    """The package map of docs/architecture.md: every import between parts goes down a layer."""
    upward = sorted(
        f"{m} -> {t}"
        for m, targets in GRAPH.items()
        for t in targets
        if part(m) != part(t) and LAYERS[part(m)] <= LAYERS[part(t)]
    )
    assert upward == [], "imports against the layering of docs/architecture.md:\n" + "\n".join(upward)
    assert {part(m) for m in GRAPH} <= set(LAYERS), "a new part: give it a layer here and in the docs"


def test_leaves_stay_leaves() -> None:
    """Modules other parts lean on so that they need not lean on each other."""
    for module in (f"{PACKAGE}.envvars", f"{PACKAGE}.kernels.ops", f"{PACKAGE}.models.registry"):
        others = sorted(t for t in GRAPH[module] if part(t) != "platform")
        assert others == [], f"{module} imports {others}"


def test_every_module_imports_on_its_own() -> None:
    """Each module first in a fresh interpreter state: a run-time cycle shows as an ImportError."""
    code = (
        "import importlib, sys\n"
        f"names = {sorted(GRAPH)!r}\n"
        "failed = []\n"
        "for name in names:\n"
        "    before = set(sys.modules)\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as err:\n"
        "        failed.append(f'{name}: {type(err).__name__}: {err}')\n"
        "    for loaded in set(sys.modules) - before:\n"  # forget the package's modules only
        f"        if loaded == {PACKAGE!r} or loaded.startswith({PACKAGE + '.'!r}):\n"
        "            del sys.modules[loaded]\n"
        "print('\\n'.join(failed))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "", result.stdout


# ------------------------------------------------------------------------------ parallelism's shape
PARALLEL = f"{PACKAGE}.runtime.parallel"
DIMS = f"{PARALLEL}.dims"
MODULES = package_modules()


def external_imports(path: Path) -> set[str]:
    """Every module name a file imports (lazy and TYPE_CHECKING imports included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_backends_live_in_runtime_parallel() -> None:
    """FSDP and DeepSpeed are imported inside runtime/parallel only (DeepSpeed in one module of it)."""
    offenders = []
    for module, path in MODULES.items():
        for name in external_imports(path):
            fsdp = name == "torch.distributed.fsdp" or name.startswith("torch.distributed.fsdp.")
            deepspeed = name == "deepspeed" or name.startswith("deepspeed.")
            if fsdp and not module.startswith(PARALLEL):
                offenders.append(f"{module} imports {name}")
            if deepspeed and module != f"{PARALLEL}.deepspeed_zero":
                offenders.append(f"{module} imports {name}")
    assert offenders == [], "\n".join(sorted(offenders))


def test_deepspeed_is_named_in_its_own_room() -> None:
    """Besides its module, only the factory that picks it (runtime/parallel/__init__.py) and the spec
    name DeepSpeed (comm/alltoall.py cites DeepSpeed-MoE's hierarchical all-to-all)."""
    allowed = {f"{PARALLEL}.deepspeed_zero", PARALLEL, f"{PACKAGE}.platform.schema", f"{PACKAGE}.comm.alltoall"}
    named = {module for module, path in MODULES.items() if "deepspeed" in path.read_text().lower()}
    assert named <= allowed, sorted(named - allowed)


def test_no_probing_of_experts() -> None:
    """The MoE layer calls its token dispatcher; nothing asks the experts what they are."""
    pattern = re.compile(r"hasattr\([^)]*experts")
    offenders = [module for module, path in MODULES.items() if pattern.search(path.read_text())]
    assert offenders == []


def test_one_device_mesh() -> None:
    """Only the dims object builds a device mesh; everything else asks it for a view."""
    offenders = [
        module for module, path in MODULES.items() if "init_device_mesh" in path.read_text() and module != DIMS
    ]
    assert offenders == []


RUN_DIR_NAMES = (
    "spec.yaml",
    "spec-history",
    "metrics.jsonl",
    "run_info.json",
    "wandb_id",
    "expert_load.bin",
    "expert_load.json",
    "events.jsonl",
    "driver.log",
    ".lease",
    "report.html",
    "checkpoint_",
)


def test_the_run_directory_layout_has_one_owner() -> None:
    """The names of a run's files appear in platform/run_dir.py only; everything else asks RunDir."""
    owner = f"{PACKAGE}.platform.run_dir"
    offenders = sorted(
        f"{module}: {name}"
        for module, path in MODULES.items()
        if module != owner
        for name in RUN_DIR_NAMES
        if f'"{name}' in path.read_text() or f"'{name}" in path.read_text()
    )
    assert offenders == []


def test_no_world_of_one_fallbacks() -> None:
    """A world of one is a mesh of one: code asks the dims or the group it is given, never whether
    torch.distributed is initialised. Only the dims (which make the one-rank group) and the topology
    (read before there is a mesh) ask."""
    allowed = {DIMS, f"{PACKAGE}.comm.topology"}
    offenders = [
        module
        for module, path in MODULES.items()
        if module not in allowed and re.search(r"\b(dist|distributed)\.is_initialized\(", path.read_text())
    ]
    assert offenders == []
