"""The package layers: who may import whom inside specserve, read from the source with `ast` (nothing is imported).

Every import counts: module level, inside functions, under `if TYPE_CHECKING:`. A package may import itself
and any package below it in LAYERS, never one above it; so the package graph has no cycle either.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "specserve"

LAYERS = (
    "data",  # the shipped data files and their paths; imports nothing
    "sampling_params",  # a request's sampling parameters; imports nothing
    "kernels",  # Triton kernels and their PyTorch references
    "model",  # the forward passes, loading, EAGLE heads
    "config",  # the engine's config dataclasses: above model, whose dtype and upcast choices they validate
    "engine",  # scheduling, KV cache, proposers, the step loop
    "llm",  # LLM, the synchronous Python API over the engine
    "specserve",  # the package itself (`from specserve import LLM, SamplingParams`)
    "traffic",  # the traffic log's records and stores
    "evaluation",  # Spec-Bench prompts, the measured systems, acceptance statistics
    "distill",  # offline distillation
    "online",  # the online trainer and the draft registry
    "server",  # the HTTP server, the draft watcher, the trainer subprocess
    "bench",  # the benchmarks
    "cli",  # the `specserve` command line
)
"""Lowest first."""


def node_of(module: str) -> str | None:
    """The layer of a dotted module name inside specserve; None outside it."""
    parts = module.split(".")
    if parts[0] != "specserve":
        return None
    if len(parts) == 1:
        return "specserve"
    return parts[1]


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) of every import in `path`: `from a import b` also yields a.b, which may be a module."""
    module = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    package = package.removesuffix(".__init__")
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            found.append((node.lineno, source))
            found += [(node.lineno, f"{source}.{alias.name}") for alias in node.names]
    return found


def edges() -> dict[tuple[str, str], list[str]]:
    """(importing layer, imported layer) -> where, for every import that crosses layers."""
    result: dict[tuple[str, str], list[str]] = {}
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent)
        src = node_of(".".join(rel.with_suffix("").parts).removesuffix(".__init__"))
        for line, module in imports_of(path):
            dst = node_of(module)
            if dst is None or dst == src:
                continue
            if module.count(".") >= 1 and dst not in LAYERS and not (ROOT / dst).exists():
                # `from specserve import LLM`: a name the package defines, not a module
                dst = "specserve"
                if dst == src:
                    continue
            result.setdefault((src, dst), []).append(f"{rel}:{line} imports {module}")
    return result


def test_every_package_and_top_level_module_has_a_layer():
    names = {p.stem for p in ROOT.glob("*.py") if p.name != "__init__.py"}
    names |= {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert names | {"specserve"} == set(LAYERS), "a new package or top-level module needs its place in LAYERS"


def test_no_layer_imports_a_higher_one():
    rank = {name: i for i, name in enumerate(LAYERS)}
    upward = [where for (src, dst), wheres in edges().items() if rank[dst] > rank[src] for where in wheres]
    assert not upward, "imports that go up the layers:\n" + "\n".join(upward)


def test_the_package_graph_has_no_cycle():
    graph: dict[str, set[str]] = {}
    for src, dst in edges():
        graph.setdefault(src, set()).add(dst)
    state: dict[str, str] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            assert state.get(nxt) != "open", "import cycle: " + " -> ".join([*stack, node, nxt])
            if nxt not in state:
                visit(nxt, [*stack, node])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])


def test_nothing_imports_the_old_top_level_kernels_package():
    """The kernels are specserve.kernels; a bare `kernels` would be another distribution's package."""
    stale = set()
    for folder in (ROOT, ROOT.parent / "tests", ROOT.parent / "bench"):
        for path in sorted(folder.rglob("*.py")):
            stale |= {f"{path}:{line}" for line, m in imports_of(path) if m.split(".")[0] == "kernels"}
    assert not stale, sorted(stale)
