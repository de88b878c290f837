"""Regenerate the committed gRPC stubs from `lowband.proto` (the `make proto` target).

    python -m protocols.wire.generate            # rewrite the stubs next to the .proto
    python -m protocols.wire.generate --check    # exit 1 if the committed stubs differ from fresh ones,
                                                 # or if an element of the .proto has no comment

The .proto is compiled with the repository root as include path, so the generated modules import each
other absolutely (`from protocols.wire import lowband_pb2`) and need no post-processing. Type stubs come
from mypy-protobuf (`protoc-gen-mypy`, `protoc-gen-mypy_grpc`), looked up next to the running Python.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

WIRE_DIR = Path(__file__).resolve().parent
REPO_ROOT = WIRE_DIR.parent.parent
PROTO = WIRE_DIR / "lowband.proto"
# Every file `generate` writes; the drift test compares exactly these.
GENERATED = ("lowband_pb2.py", "lowband_pb2.pyi", "lowband_pb2_grpc.py", "lowband_pb2_grpc.pyi")


class GenerateError(RuntimeError):
    """protoc or one of its plugins is missing or failed."""


def _plugin(name: str) -> Path:
    """A protoc plugin installed in the same environment as this interpreter."""
    candidates = [Path(sys.executable).parent / name]
    found = shutil.which(name)
    if found:
        candidates.append(Path(found))
    for path in candidates:
        if path.is_file():
            return path
    raise GenerateError(f"protoc plugin {name!r} not found; install the dev extra (pip install -e '.[dev]')")


def generate(out_dir: Path) -> list[Path]:
    """Compile `lowband.proto` into `out_dir` (created if needed); return the files written."""
    from grpc_tools import protoc  # dev-only dependency: imported here so importing this module is cheap

    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{REPO_ROOT}",
            f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
            f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
            f"--python_out={tmp}",
            f"--grpc_python_out={tmp}",
            f"--mypy_out=quiet:{tmp}",
            f"--mypy_grpc_out=quiet:{tmp}",
            str(PROTO.relative_to(REPO_ROOT)),
        ]
        if protoc.main(args) != 0:
            raise GenerateError(f"protoc failed on {PROTO}")
        produced = Path(tmp) / PROTO.parent.relative_to(REPO_ROOT)
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for name in GENERATED:
            source = produced / name
            if not source.is_file():
                raise GenerateError(f"protoc did not produce {name}")
            target = out_dir / name
            shutil.copyfile(source, target)
            written.append(target)
    return written


def drifted(committed_dir: Path, fresh_dir: Path) -> list[str]:
    """Names of generated files that are missing from `committed_dir` or differ byte-for-byte from `fresh_dir`."""
    stale = []
    for name in GENERATED:
        committed = Path(committed_dir) / name
        if not committed.is_file() or committed.read_bytes() != (Path(fresh_dir) / name).read_bytes():
            stale.append(name)
    return stale


# Field numbers of FileDescriptorProto / DescriptorProto / ... that SourceCodeInfo paths are made of.
_MESSAGE, _ENUM, _SERVICE, _FIELD, _ONEOF, _ENUM_VALUE, _METHOD = 4, 5, 6, 2, 8, 2, 2


def uncommented(proto_path: Path = PROTO) -> list[str]:
    """Messages, fields, oneofs, enums, enum values, services and rpcs of the .proto that carry no comment.

    The design requires every element of the wire protocol to say what it is and why.
    """
    from google.protobuf import descriptor_pb2
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "lowband.desc"
        args = ["grpc_tools.protoc", f"-I{proto_path.parent}", "--include_source_info", f"--descriptor_set_out={out}"]
        if protoc.main([*args, proto_path.name]) != 0:
            raise GenerateError(f"protoc failed on {proto_path}")
        proto = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    commented = {
        tuple(loc.path)
        for loc in proto.source_code_info.location
        if loc.leading_comments.strip() or loc.trailing_comments.strip()
    }
    elements: list[tuple[tuple[int, ...], str]] = []
    for i, msg in enumerate(proto.message_type):
        elements.append(((_MESSAGE, i), msg.name))
        elements += [((_MESSAGE, i, _FIELD, j), f"{msg.name}.{f.name}") for j, f in enumerate(msg.field)]
        elements += [((_MESSAGE, i, _ONEOF, j), f"{msg.name}.{o.name}") for j, o in enumerate(msg.oneof_decl)]
    for i, enum in enumerate(proto.enum_type):
        elements.append(((_ENUM, i), enum.name))
        elements += [((_ENUM, i, _ENUM_VALUE, j), f"{enum.name}.{v.name}") for j, v in enumerate(enum.value)]
    for i, service in enumerate(proto.service):
        elements.append(((_SERVICE, i), service.name))
        elements += [((_SERVICE, i, _METHOD, j), f"{service.name}.{m.name}") for j, m in enumerate(service.method)]
    return [name for path, name in elements if path not in commented]


def check() -> list[str]:
    """Regenerate into a temporary directory and return the committed stubs that are out of date."""
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        return drifted(WIRE_DIR, Path(tmp))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only compare the committed stubs with fresh ones")
    parser.add_argument("--out", type=Path, default=WIRE_DIR, help="where to write the stubs (default: here)")
    args = parser.parse_args(argv)
    if args.check:
        stale, bare = check(), uncommented()
        if stale:
            print(f"stale generated stubs: {', '.join(stale)}; run `make proto`", file=sys.stderr)
        if bare:
            print(f"elements of {PROTO.name} without a comment: {', '.join(bare)}", file=sys.stderr)
        if stale or bare:
            return 1
        print("generated stubs are up to date and every element of the .proto is commented")
        return 0
    for path in generate(args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
