"""Dependencies run one way: ``libra_kernels`` <- the model side of ``libra_model`` <- ``libra_model.parallel`` and
the trainer. Every import of every module is read with ``ast``, those inside functions included."""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("libra_kernels", "libra_model")
# The application side of libra_model (the trainer with its parallel machinery, optimizer and data pipelines, and the
# evaluation built on them): the only modules that may import libra_model.parallel, the trainer or the data pipelines.
TRAINER_SIDE = ("libra_model.parallel", "libra_model.trainer", "libra_model.train_step", "libra_model.optim",
                "libra_model.data", "libra_model.evaluate", "libra_model.eval", "libra_model.plan",
                "libra_model.memory")


def _modules() -> dict[str, str]:
    found = {}
    for package in PACKAGES:
        for directory, _, files in os.walk(os.path.join(ROOT, package)):
            for file in files:
                if file.endswith(".py"):
                    path = os.path.join(directory, file)
                    parts = os.path.relpath(path, ROOT)[:-3].split(os.sep)
                    if parts[-1] == "__init__":
                        parts = parts[:-1]
                    found[".".join(parts)] = path
    return found


def _imports(name: str, path: str, modules: dict[str, str]) -> set[str]:
    """The project modules ``name`` imports anywhere in its file (module level or inside functions)."""
    is_package = path.endswith("__init__.py")
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # "from pkg import mod" imports the submodule when there is one, else a name of pkg.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def _graph():
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _is_trainer_side(name: str) -> bool:
    return any(name == side or name.startswith(side + ".") for side in TRAINER_SIDE)


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    # Package __init__ files re-export lazily; an edge to a package means "something in it", so skip packages
    # importing their own children (that is how a package exposes them) but keep every other edge.
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph[node]):
            if node.startswith(target + ".") or target.startswith(node + "."):
                continue
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_no_import_cycle():
    graph = _graph()
    assert "libra_model.model" in graph and "libra_kernels" in graph
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_dependencies_run_one_way():
    problems = []
    for name, targets in _graph().items():
        for target in targets:
            if name.startswith("libra_kernels") and target.startswith("libra_model"):
                problems.append(f"{name} imports {target} (kernels must not import the model)")
            elif name.startswith("libra_model") and not _is_trainer_side(name) and _is_trainer_side(target):
                problems.append(f"{name} imports {target} (the model must not import the trainer side)")
    assert not problems, "\n".join(problems)


def test_the_checker_sees_function_level_imports(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("def f():\n    from libra_model.parallel import tp_plan\n    import libra_model.trainer\n")
    modules = _modules()
    assert _imports("libra_model.model", str(path), modules) == {"libra_model.parallel.tp_plan", "libra_model.trainer"}
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


@pytest.mark.parametrize("name", ["libra_model.parallel.step", "libra_model.parallel.loss", "libra_model.checkpoint",
                                  "libra_model.generation", "libra_model.parallel.layout",
                                  "libra_model.parallel.checkpointing"])
def test_old_module_names_are_gone(name):
    assert name not in _modules()
