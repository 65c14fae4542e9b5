"""The math knows nothing of Ray, MLflow or DeepSpeed: algorithms/, weights.py and families/
import none of them, so every piece runs in one process (docs/architecture.md)."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "dopsd_ray"
PURE = (sorted((PKG / "algorithms").glob("*.py")) + [PKG / "weights.py"] + sorted((PKG / "families").glob("*.py"))
        + [PKG / "evaluation.py", PKG / "embeddings.py", PKG / "exports.py"])
FORBIDDEN = {"ray", "mlflow", "deepspeed"}


@pytest.mark.parametrize("path", PURE, ids=lambda p: str(p.relative_to(PKG)))
def test_pure_modules_import_no_runtime(path):
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            imported.add(node.module.split(".")[0])
    assert not imported & FORBIDDEN, f"{path.name} imports {imported & FORBIDDEN}"


# torch.distributed calls that are collectives of the default (learner) group
COLLECTIVES = {
    "all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "all_gather_object", "reduce",
    "reduce_scatter", "reduce_scatter_tensor", "gather", "gather_object", "scatter", "scatter_object_list",
    "barrier", "all_to_all", "all_to_all_single", "broadcast_object_list", "send", "recv", "isend", "irecv",
}
RANK_AGREEMENT = PKG / "ranks.py"  # the one place (its tensors live on the learner's device)


@pytest.mark.parametrize("path", sorted(PKG.rglob("*.py")), ids=lambda p: str(p.relative_to(PKG)))
def test_torch_distributed_collectives_are_called_in_ranks_py_only(path):
    """NCCL has no CPU backend: one place builds every collective's tensor on the learner's device."""
    if path == RANK_AGREEMENT:
        return
    tree = ast.parse(path.read_text())
    aliases = {"torch.distributed"}  # names bound to torch.distributed in this file
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {a.asname or a.name for a in node.names if a.name == "torch.distributed"}
        elif isinstance(node, ast.ImportFrom) and node.module == "torch" and node.level == 0:
            aliases |= {a.asname or a.name for a in node.names if a.name == "distributed"}
        elif isinstance(node, ast.ImportFrom) and node.module == "torch.distributed":
            direct = {a.name for a in node.names} & COLLECTIVES
            assert not direct, f"{path.name} imports {direct} from torch.distributed: call them in ranks.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in COLLECTIVES:
            owner = ast.unparse(node.func.value)
            assert owner not in aliases, (f"{path.name}:{node.lineno} calls {owner}.{node.func.attr}: "
                                          "learner collectives go through dopsd_ray/ranks.py")


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, as absolute dotted names (relative imports resolved;
    `from a import b` counts as both a and a.b, since b may be a module)."""
    package = ".".join(path.relative_to(PKG.parent).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(parent + ([node.module] if node.module else []))
            names |= {base} | {f"{base}.{a.name}" for a in node.names}
    return names


@pytest.mark.parametrize("path", sorted((PKG / "families").glob("*.py")), ids=lambda p: str(p.relative_to(PKG)))
def test_families_do_not_import_the_toy_world(path):
    """dopsd_ray/toy/ builds its base on families/toy.py; the way back would be an import cycle."""
    toy = {m for m in imported_modules(path) if m == "dopsd_ray.toy" or m.startswith("dopsd_ray.toy.")}
    assert not toy, f"{path.name} imports {sorted(toy)}: pass what it needs from the toy world in as arguments"
