"""The import-layer contract (DESIGN.md, Layering rules), read from the source with ``ast``.

    runtimes  <-  device_profiles  <-  exporter  <-  tools

Every import counts, the ones inside functions too (they are how a cycle hides): each module
of the package is parsed, relative imports are resolved, and ``from pkg import name`` counts
as an import of ``pkg.name`` when that is a module. On that graph:

- a layer imports only the layers to its left (the CLI is the top: nothing imports it);
- no module is part of an import cycle (strongly connected components of the graph), save
  the ones in :data:`KNOWN_CYCLES`, each naming the issue that removes it;
- the library parses no command line (argparse is tools/'), except the processes the CLI
  starts on a device (:data:`ARGPARSE_ENTRY_POINTS`);
- runtimes/ and device_profiles/ never import the export stack (torch, transformers, onnx,
  onnxscript, ...): they run on a Pi with onnxruntime + numpy (``test_torch_free.py`` imports
  them in a fresh interpreter; this test also sees the function-level imports it cannot).

The benchmark scripts of ``tools/bench/`` are repository scripts, not modules of the package.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
#: top-level folder -> the layers it may import (itself included)
LAYERS = {
    "runtimes": {"runtimes"},
    "device_profiles": {"device_profiles", "runtimes"},
    "exporter": {"exporter", "device_profiles", "runtimes"},
    "tools": {"tools", "exporter", "device_profiles", "runtimes"},
}
#: Not part of the installed package (repository scripts, run from the checkout).
NOT_PACKAGE = (REPO / "tools" / "bench",)
#: Imported by runtimes/ or device_profiles/ these would put the export stack on a phone.
HEAVY = {"torch", "transformers", "onnx", "onnxscript", "onnx_ir", "tensorflow",
         "litert_torch", "ai_edge_quantizer", "accelerate", "safetensors", "gguf", "optimum"}

#: Library modules that parse a command line: processes the CLI starts on a target, where only
#: runtimes/ is copied (``python -m ...`` over SSH / ADB). Any other argparse belongs in tools/.
ARGPARSE_ENTRY_POINTS: dict[str, str] = {
    "slmedge.runtimes.bench.runner": "the runner on the device (runtimes/bench/remote.py starts it)",
    "slmedge.runtimes.check.target_card": "the quality card replayed on the device (remote_card.py)",
}

#: Cycles that exist today and belong to work in progress elsewhere; any other cycle fails.
#: Remove an entry when its cycle is gone (test_known_cycles_still_exist says when).
KNOWN_CYCLES: dict[frozenset[str], str] = {}
#: (module, package): a heavy import a torch-free module makes when the package is there.
OPTIONAL_HEAVY: dict[tuple[str, str], str] = {
    ("slmedge.runtimes.check.placement", "onnx"):
        "slmedge check (run where the artifact was made, not on the device) reads the graph's "
        "op types with onnx when it is installed; its entry points catch the ImportError",
}


def module_files(repo: Path = REPO) -> dict[str, Path]:
    """``slmedge.<layer>.<...>`` -> its file, for every module of the four layers."""
    found: dict[str, Path] = {}
    for layer in LAYERS:
        for path in sorted((repo / layer).rglob("*.py")):
            if any(path.is_relative_to(p) for p in NOT_PACKAGE) or "__pycache__" in path.parts:
                continue
            parts = list(path.relative_to(repo).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(["slmedge", *parts])] = path
    return found


def _imports(tree: ast.AST, module: str, is_package: bool, known: set[str]) -> set[str]:
    """Absolute names of everything ``tree`` imports (submodules resolved when known)."""
    package = module if is_package else module.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            subs = {f"{target}.{alias.name}" for alias in node.names}
            named = subs & known
            out.update(named)
            if len(named) < len(subs):  # some names are attributes of target itself
                out.add(target)
    return out


def import_graph(files: dict[str, Path]) -> dict[str, set[str]]:
    """module -> every module of ``files`` and every outside top-level package it imports."""
    known = set(files)
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        names = _imports(tree, module, path.name == "__init__.py", known)
        graph[module] = {n if n in known else n.split(".")[0] for n in names} - {module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in graph:
                    continue  # outside the package
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
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
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(frozenset(component))
    return found


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """``a -> b`` for every import of a layer the importer may not use."""
    bad = []
    for module, targets in graph.items():
        layer = module.split(".")[1]
        for target in sorted(targets):
            parts = target.split(".")
            if parts[0] == "slmedge" and len(parts) > 1 and parts[1] not in LAYERS[layer]:
                bad.append(f"{module} -> {target}")
    return bad


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(module_files())


def test_the_walk_sees_the_package(graph):
    layers = {m.split(".")[1] for m in graph}
    assert layers == set(LAYERS)
    assert len(graph) >= 80  # every module, not just the __init__ files
    assert "slmedge.tools.cli.app" in graph and "slmedge.exporter.quantize.core" in graph
    assert not any(".bench." in m for m in graph if m.startswith("slmedge.tools"))
    # function-level and relative imports are seen: tools.cli.app imports the exporter in cmd_export
    assert "slmedge.exporter.pipeline" in graph["slmedge.tools.cli.app"]
    assert "slmedge.exporter.quantize.qdq" in graph["slmedge.exporter.quantize.core"]


def test_each_layer_imports_only_the_layers_below_it(graph):
    assert layer_violations(graph) == []


def test_no_import_cycles_but_the_known_ones(graph):
    unknown = [sorted(c) for c in cycles(graph) if c not in KNOWN_CYCLES]
    assert unknown == [], "import cycles (function-level imports included): " + "; ".join(
        " <-> ".join(c) for c in unknown)


def test_known_cycles_still_exist(graph):
    """An allow-list entry whose cycle is gone must go too, or it would hide a new one."""
    present = set(cycles(graph))
    gone = [sorted(c) for c in KNOWN_CYCLES if c not in present]
    assert gone == [], f"remove from KNOWN_CYCLES: {gone}"


def test_the_library_parses_no_command_line_but_its_device_entry_points(graph):
    """Flags live in tools/ (DESIGN.md: the CLI is thin; the library takes typed configs)."""
    parsers = {m for m, targets in graph.items()
               if "argparse" in targets and not m.startswith("slmedge.tools")}
    assert sorted(parsers - set(ARGPARSE_ENTRY_POINTS)) == []
    assert set(ARGPARSE_ENTRY_POINTS) <= parsers, "an ARGPARSE_ENTRY_POINTS entry is gone"


def test_runtimes_and_profiles_never_import_the_export_stack(graph):
    heavy = {(m, t) for m, targets in graph.items() for t in targets
             if m.split(".")[1] in ("runtimes", "device_profiles") and t in HEAVY}
    assert sorted(heavy - set(OPTIONAL_HEAVY)) == []
    assert set(OPTIONAL_HEAVY) <= heavy, "an OPTIONAL_HEAVY entry is gone: remove it"


# -- the checker itself, on synthetic packages --------------------------------------------


def _write(root: Path, files: dict[str, str]) -> dict[str, set[str]]:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for layer in LAYERS:
        (root / layer).mkdir(exist_ok=True)
        (root / layer / "__init__.py").touch()
    return import_graph(module_files(root))


def test_checker_finds_a_cycle_hidden_in_a_function(tmp_path):
    graph = _write(tmp_path, {
        "exporter/a.py": "from .b import thing\n",
        "exporter/b.py": "thing = 1\n\ndef later():\n    from .sub import c\n",
        "exporter/sub/__init__.py": "",
        "exporter/sub/c.py": "def f():\n    from slmedge.exporter import a\n",
        "exporter/d.py": "from . import a\n",  # imports into the cycle, is not part of it
    })
    assert graph["slmedge.exporter.b"] == {"slmedge.exporter.sub.c"}
    assert graph["slmedge.exporter.sub.c"] == {"slmedge.exporter.a"}
    assert cycles(graph) == [frozenset({"slmedge.exporter.a", "slmedge.exporter.b",
                                        "slmedge.exporter.sub.c"})]
    assert cycles(graph)[0] not in KNOWN_CYCLES  # so the contract test would fail on it


def test_checker_finds_layer_violations_and_heavy_imports(tmp_path):
    graph = _write(tmp_path, {
        "runtimes/r.py": "import numpy\n\ndef f():\n    import torch\n"
                         "    from ..tools import cli\n",
        "device_profiles/p.py": "from slmedge.exporter.x import y\n",
        "exporter/x.py": "y = 1\nfrom slmedge.runtimes import r\n",
        "tools/cli.py": "from slmedge.exporter import x\n",
    })
    assert sorted(layer_violations(graph)) == ["slmedge.device_profiles.p -> slmedge.exporter.x",
                                               "slmedge.runtimes.r -> slmedge.tools.cli"]
    assert "torch" in graph["slmedge.runtimes.r"]
    # and the upward import closed a loop through all three layers
    assert cycles(graph) == [frozenset({"slmedge.runtimes.r", "slmedge.tools.cli",
                                        "slmedge.exporter.x"})]
