"""The layout rules of docs/architecture.md, checked on the source: no import cycle between modules (lazy imports
inside functions count too), the library never imports an application, the tuner imports only what it needs, and no
module outside the tuner uses a leading-underscore name of it."""

from __future__ import annotations

import ast
from pathlib import Path

import peft_personamux

ROOT = Path(peft_personamux.__file__).parent
PACKAGE = "peft_personamux"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """``{module: modules of the package it imports}``, from the source files (nothing is imported)."""
    paths = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in paths}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                # `from .pkg import module` names a module; `from .module import name` names the module
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in paths else base for a in node.names]
            else:
                continue
            graph[name].update(t for t in targets if t in paths and t != name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_graph_sees_the_package():
    graph = import_graph()
    assert f"{PACKAGE}.tuner.model" in graph and f"{PACKAGE}.inputs" in graph[f"{PACKAGE}.tuner.model"]


def test_find_cycle_reports_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


# the applications built on the library (docs/architecture.md); benchmarks/ and examples/ are outside the package
APPLICATIONS = ("training", "cli", "evaluation", "server", "chat", "conversation", "codebook_loading", "subnetwork")


def layer_of(module: str) -> str:
    return module.split(".")[1] if module.count(".") else ""


def test_library_never_imports_an_application():
    graph = import_graph()
    wrong = {
        (module, target)
        for module, targets in graph.items()
        if layer_of(module) not in APPLICATIONS
        for target in targets
        if layer_of(target) in APPLICATIONS
    }
    assert not wrong, sorted(wrong)


def test_tuner_imports_only_inputs_persona_files_and_itself():
    graph = import_graph()
    allowed = {f"{PACKAGE}.inputs", f"{PACKAGE}.persona_files"}
    for module, targets in graph.items():
        if module.startswith(f"{PACKAGE}.tuner"):
            assert all(t in allowed or t.startswith(f"{PACKAGE}.tuner") for t in targets), (module, targets)
    assert graph[f"{PACKAGE}.tuner.peft_type"] == set()  # the peft-type extension imports nothing from the package


def tuner_private_names() -> set[str]:
    from peft_personamux.tuner.model import PersonaMuxModel

    names = {n for cls in PersonaMuxModel.__mro__ if cls.__module__.startswith(f"{PACKAGE}.tuner") for n in vars(cls)}
    state = {"_persona_names", "_active_persona", "_persona_dir", "_trainable_rows", "_grad_hooks", "_bias_scale"}
    return {n for n in names if n.startswith("_") and not n.startswith("__")} | state


def test_no_module_outside_the_tuner_uses_its_private_names():
    private = tuner_private_names()
    assert {"_persona_names", "_bias_scale", "_cast_adapter_dtype"} <= private
    found: dict[str, set[str]] = {}
    for path in ROOT.rglob("*.py"):
        module = module_name(path)
        if module.startswith(f"{PACKAGE}.tuner"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            receiver = getattr(node, "value", None)
            if isinstance(node, ast.Attribute) and node.attr in private:
                if not (isinstance(receiver, ast.Name) and receiver.id in ("self", "cls")):
                    found.setdefault(module[len(PACKAGE) + 1 :], set()).add(node.attr)
    assert not found, f"use the tuner's public names (prepare, prompt_request, personamux_layer, ...): {found}"
