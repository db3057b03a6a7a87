"""The layout shows the architecture (shared/DESIGN.md): layers import only from the layers below them, the
shard-set contract is the only part of data_prep that training uses, the loader backends sit behind one
interface without import cycles, and every collective goes through pipeline/engine/distributed.py."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import REPO

PACKAGES = ("swin_common", "data_prep", "pipeline")


def modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def imports_of(name: str, path: Path) -> set[str]:
    """The project modules `name` imports, anywhere in its body (function-level imports count)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)  # `from pkg import module`
    known = modules()
    return {m for m in found if m in known and m != name}


GRAPH = {name: imports_of(name, path) for name, path in modules().items()}


# the layers of shared/DESIGN.md, lowest first, by module prefix (the first that matches wins); anything else is
# a command (layer 8): pipeline/{train,export,pull,predict,register,demo}.py, data_prep's cli
LAYERS = (
    ("swin_common", 0),
    ("data_prep.shardset", 1),
    ("data_prep", 2),
    ("pipeline.config", 3),
    ("pipeline.data", 4),
    ("pipeline.model", 5),
    ("pipeline.engine", 6),
    ("pipeline.tracking", 7),
)


def layer(module: str) -> int:
    return next((n for prefix, n in LAYERS if module == prefix or module.startswith(prefix + ".")), 8)


def test_the_graph_is_read():
    assert "data_prep.shardset.store" in GRAPH["pipeline.data.reader"]
    assert "pipeline.engine.trainer" in GRAPH["pipeline.train"]


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_no_module_imports_from_a_layer_above_it(module):
    if module in ("data_prep.cli", "data_prep.__main__"):
        above = sorted(m for m in GRAPH[module] if m.startswith("pipeline"))  # data_prep's command: any prep job
    elif module.startswith(("data_prep", "swin_common")):
        above = sorted(m for m in GRAPH[module] if m.startswith("pipeline") or layer(m) > layer(module))
    else:
        above = sorted(m for m in GRAPH[module] if layer(m) > layer(module) and not m.startswith("data_prep"))
    assert not above, f"{module} (layer {layer(module)}) imports {above}"


def test_training_uses_only_the_shard_set_contract_from_data_prep():
    for module, deps in GRAPH.items():
        if module.startswith("pipeline"):  # the main job too: it runs `python -m data_prep` as a user does
            others = sorted(d for d in deps if d.startswith("data_prep") and not d.startswith("data_prep.shardset"))
            assert not others, f"{module} imports {others}"


def cycles() -> list[list[str]]:
    seen, stack, found = set(), [], []

    def visit(node):
        if node in stack:
            found.append(stack[stack.index(node) :] + [node])
            return
        if node in seen:
            return
        seen.add(node)
        stack.append(node)
        for dep in sorted(GRAPH[node]):
            if not dep.endswith("__init__"):
                visit(dep)
        stack.pop()

    for node in sorted(GRAPH):
        visit(node)
    return found


def test_no_import_cycles():
    # a package's __init__ re-exporting its own modules is not a cycle between modules
    real = [c for c in cycles() if not any(GRAPH.get(a) and a + "." in b for a, b in zip(c, c[1:], strict=False))]
    assert not real, real


def test_the_loader_backends_do_not_import_the_loader():
    for backend in ("pipeline.data.torch_backend", "pipeline.data.dali_backend"):
        assert "pipeline.data.loader" not in GRAPH[backend]
    assert "pipeline.data.torch_backend" not in GRAPH["pipeline.data.loader"]  # chosen by backend.create_backend


COLLECTIVES = {
    "all_reduce",
    "all_gather",
    "all_gather_object",
    "broadcast",
    "broadcast_object_list",
    "barrier",
    "reduce",
    "reduce_scatter",
    "all_to_all",
    "gather",
    "scatter",
    "send",
    "recv",
    "destroy_process_group",
    "init_process_group",
    "monitored_barrier",
}


def test_every_collective_goes_through_the_distributed_helper():
    offenders = []
    for name, path in modules().items():
        if name == "pipeline.engine.distributed":
            continue
        tree = ast.parse(path.read_text())
        aliases = {
            a.asname or a.name
            for n in ast.walk(tree)
            if isinstance(n, ast.Import)
            for a in n.names
            if a.name == "torch.distributed"
        }
        aliases |= {
            a.asname or a.name
            for n in ast.walk(tree)
            if isinstance(n, ast.ImportFrom) and n.module == "torch"
            for a in n.names
            if a.name == "distributed"
        }
        direct = {
            a.asname or a.name
            for n in ast.walk(tree)
            if isinstance(n, ast.ImportFrom) and n.module == "torch.distributed"
            for a in n.names
            if a.name in COLLECTIVES
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in COLLECTIVES:
                base = ast.unparse(node.value)
                if base in aliases or base == "torch.distributed":
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno} {base}.{node.attr}")
        offenders += [f"{path.relative_to(REPO)}: imports {d} from torch.distributed" for d in sorted(direct)]
    assert not offenders, offenders


def test_command_modules_and_library_modules_do_not_share_a_name():
    commands = {p.stem for p in (REPO / "pipeline").glob("*.py") if p.stem not in ("__init__", "config")}
    libraries = {p.stem for p in (REPO / "pipeline").rglob("*.py") if p.parent != REPO / "pipeline"}
    assert commands >= {"train", "export", "pull", "predict", "register", "demo", "evaluate"}
    assert not commands & libraries, commands & libraries
