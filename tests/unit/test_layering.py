"""The dependency rule of DESIGN.md, enforced: import-linter contracts plus what they cannot express.

Every contract is also shown to bite: a probe test copies the packages and pyproject.toml into a temporary
directory, appends one forbidden import to one module of the copy, runs import-linter on the copy and checks
that the contract is reported broken (and that the unmodified copy passes, so it is the probe that breaks it).
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
from importlinter.cli import lint_imports

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("compression", "protocols", "coordinator", "worker", "deploy")

# The contracts of pyproject.toml, by a short key used in the probe test ids.
CONTRACTS = {
    "layers": "Layers: deploy -> coordinator | worker -> protocols -> compression",
    "compression-pure": "Compression imports no protocols.wire, grpc, protobuf or ray",
    "protocols-pure": "Pure protocol modules import no protocols.wire, grpc, protobuf or ray",
    "wire-grpc-only-in-pb2-grpc": (
        "In protocols.wire only the generated lowband_pb2_grpc and the servicers' shared servicing import grpc"
    ),
    "coordinator-state-no-transport": "The coordinator state machine imports no grpc and no protocols.wire",
    "pb2-only-via-serde": "Only wire.serde, wire.tensor_chunks and lowband_pb2_grpc import lowband_pb2",
    "ray-only-in-deploy": "Ray appears only in deploy",
}


def test_import_linter_contracts_hold() -> None:
    # Contracts live in pyproject.toml: the layers, pure algorithms, wire confinement, Ray only in deploy.
    assert lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True) == 0


def test_every_contract_in_pyproject_is_known_and_probed() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    names = [c["name"] for c in config["tool"]["importlinter"]["contracts"]]
    assert sorted(names) == sorted(CONTRACTS.values())
    assert {probe.contract for probe in PROBES} == set(CONTRACTS)


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _torch_distributed_imports(path: Path) -> list[str]:
    return sorted(n for n in _imports(path) if n == "torch.distributed" or n.startswith("torch.distributed."))


def _pure_files(root: Path = ROOT) -> list[Path]:
    files = list((root / "compression").rglob("*.py")) + list((root / "protocols").rglob("*.py"))
    return [f for f in files if "wire" not in f.relative_to(root).parts]


@pytest.mark.parametrize("path", _pure_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_algorithms_do_not_import_torch_distributed(path: Path) -> None:
    # import-linter sees external packages only at top level (torch), so torch.distributed is checked here.
    bad = _torch_distributed_imports(path)
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}: algorithms must stay transport-free"


def test_the_pure_file_list_is_not_empty() -> None:
    assert len(_pure_files()) >= 5


# --- probes: each contract must be breakable -------------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    contract: str  # a key of CONTRACTS
    module: str  # path of the module, relative to the repository root
    line: str  # the forbidden import appended to it

    @property
    def id(self) -> str:
        return f"{self.contract}:{self.module}:{self.line}"


PROBES = [
    Probe("layers", "compression/chunks.py", "from protocols import base"),
    Probe("layers", "coordinator/errors.py", "import worker.data"),
    Probe("layers", "protocols/config.py", "import coordinator.errors"),
    Probe("compression-pure", "compression/payload.py", "import google.protobuf"),
    Probe("compression-pure", "compression/payload.py", "from protocols.wire import messages"),
    Probe("compression-pure", "compression/packing.py", "import grpc"),
    Probe("protocols-pure", "protocols/outer.py", "from protocols.wire import serde"),
    Probe("protocols-pure", "protocols/__init__.py", "from protocols.wire import messages"),
    Probe("protocols-pure", "protocols/base.py", "from google.protobuf import message"),
    Probe("protocols-pure", "protocols/config.py", "import grpc"),
    Probe("wire-grpc-only-in-pb2-grpc", "protocols/wire/serde.py", "import grpc"),
    Probe("wire-grpc-only-in-pb2-grpc", "protocols/wire/messages.py", "from grpc import StatusCode"),
    Probe("coordinator-state-no-transport", "coordinator/state.py", "import grpc"),
    Probe("coordinator-state-no-transport", "coordinator/state.py", "from protocols.wire import serde"),
    Probe("pb2-only-via-serde", "protocols/wire/messages.py", "from protocols.wire import lowband_pb2"),
    Probe("pb2-only-via-serde", "worker/client.py", "from protocols.wire import lowband_pb2"),
    Probe("ray-only-in-deploy", "worker/trainer.py", "import ray"),
    Probe("ray-only-in-deploy", "coordinator/server.py", "import ray.util"),
]


def _copy_tree(dest: Path) -> Path:
    for package in PACKAGES:
        shutil.copytree(ROOT / package, dest / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy2(ROOT / "pyproject.toml", dest / "pyproject.toml")
    return dest


def _append(path: Path, line: str) -> None:
    path.write_text(path.read_text().rstrip("\n") + f"\n{line}\n")


def _lint(copy: Path) -> tuple[int, str]:
    """Run import-linter on the copy in a fresh interpreter: the copy, not the editable install, is on top."""
    env = {**os.environ, "PYTHONPATH": str(copy), "COLUMNS": "400", "NO_COLOR": "1", "TERM": "dumb"}
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "from importlinter.cli import lint_imports_command; lint_imports_command()",
            str(copy / "pyproject.toml"),
            "--no-cache",
        ],
        cwd=copy,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    # Rich wraps long lines; compare with whitespace collapsed.
    return done.returncode, " ".join((done.stdout + done.stderr).split())


def _broken(output: str) -> set[str]:
    return {key for key, name in CONTRACTS.items() if re.search(re.escape(name) + r" BROKEN", output)}


def test_the_unmodified_copy_passes(tmp_path: Path) -> None:
    copy = _copy_tree(tmp_path)
    rc, output = _lint(copy)
    assert rc == 0, output
    for name in CONTRACTS.values():
        assert re.search(re.escape(name) + r" KEPT", output), f"{name!r} not reported kept:\n{output}"
    assert _broken(output) == set()
    for path in _pure_files(copy):
        assert not _torch_distributed_imports(path)


@pytest.mark.parametrize("probe", PROBES, ids=lambda p: p.id)
def test_probe_breaks_contract(probe: Probe, tmp_path: Path) -> None:
    copy = _copy_tree(tmp_path)
    target = copy / probe.module
    assert target.is_file(), f"probe target {probe.module} is gone: pick another module"
    _append(target, probe.line)
    rc, output = _lint(copy)
    assert rc != 0, f"{probe.line!r} in {probe.module} broke nothing:\n{output}"
    assert probe.contract in _broken(output), f"expected {CONTRACTS[probe.contract]!r} BROKEN:\n{output}"
    # The probe's own line is what the report blames.
    module = probe.module.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
    assert module in output


def test_probe_torch_distributed_is_caught_by_the_ast_check(tmp_path: Path) -> None:
    # Not expressible in import-linter (torch is allowed, torch.distributed is not): the AST check must bite.
    copy = _copy_tree(tmp_path)
    target = copy / "compression" / "payload.py"
    assert not _torch_distributed_imports(target)
    _append(target, "import torch.distributed")
    assert _torch_distributed_imports(target) == ["torch.distributed"]
    target = copy / "protocols" / "outer.py"
    _append(target, "from torch.distributed import all_reduce")
    assert _torch_distributed_imports(target) == ["torch.distributed", "torch.distributed.all_reduce"]
