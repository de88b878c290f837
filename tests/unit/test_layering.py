"""The dependency rule of DESIGN.md, enforced: import-linter contracts plus what they cannot express."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from importlinter.cli import lint_imports

ROOT = Path(__file__).resolve().parents[2]


def test_import_linter_contracts_hold() -> None:
    # Contracts live in pyproject.toml: the layers, pure algorithms, Ray only in deploy.
    assert lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True) == 0


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _pure_files() -> list[Path]:
    files = list((ROOT / "compression").rglob("*.py")) + list((ROOT / "protocols").rglob("*.py"))
    return [f for f in files if "wire" not in f.relative_to(ROOT).parts]


@pytest.mark.parametrize("path", _pure_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_algorithms_do_not_import_torch_distributed(path: Path) -> None:
    # import-linter sees external packages only at top level (torch), so torch.distributed is checked here.
    bad = sorted(n for n in _imports(path) if n == "torch.distributed" or n.startswith("torch.distributed."))
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}: algorithms must stay transport-free"


def test_the_pure_file_list_is_not_empty() -> None:
    assert len(_pure_files()) >= 5
