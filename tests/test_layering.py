"""The math knows nothing of Ray, MLflow or DeepSpeed (style.md)."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "dopsd_ray"
PURE = sorted((PKG / "algorithms").glob("*.py")) + [PKG / "weights.py"] + sorted((PKG / "families").glob("*.py"))
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
