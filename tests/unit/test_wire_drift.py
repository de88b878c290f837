"""The committed stubs are exactly what `make proto` generates from lowband.proto, and the .proto is commented."""

from __future__ import annotations

import shutil
from pathlib import Path

from protocols.wire import generate, lowband_pb2, lowband_pb2_grpc


def test_committed_stubs_match_a_fresh_generation(tmp_path: Path) -> None:
    written = generate.generate(tmp_path)
    assert sorted(p.name for p in written) == sorted(generate.GENERATED)
    stale = generate.drifted(generate.WIRE_DIR, tmp_path)
    assert not stale, f"generated stubs {stale} are out of date with lowband.proto: run `make proto`"


def test_drift_is_detected(tmp_path: Path) -> None:
    fresh, committed = tmp_path / "fresh", tmp_path / "committed"
    generate.generate(fresh)
    shutil.copytree(fresh, committed)
    assert generate.drifted(committed, fresh) == []
    stub = committed / "lowband_pb2_grpc.py"
    stub.write_bytes(stub.read_bytes() + b"\n")
    (committed / "lowband_pb2.pyi").unlink()
    assert generate.drifted(committed, fresh) == ["lowband_pb2.pyi", "lowband_pb2_grpc.py"]


def test_grpc_stub_imports_the_package_module() -> None:
    assert getattr(lowband_pb2_grpc, "protocols_dot_wire_dot_lowband__pb2") is lowband_pb2  # noqa: B009
    assert lowband_pb2.DESCRIPTOR.package == "lowband.v1"
    methods = set(lowband_pb2.DESCRIPTOR.services_by_name["Coordinator"].methods_by_name)
    assert methods == {"Join", "Heartbeat", "Leave", "PullState", "PullAggregate", "PushUpdate", "ReservePush",
                       "WaitRound", "AttestBase", "Status"}
    pull_aggregate = lowband_pb2.DESCRIPTOR.services_by_name["Coordinator"].methods_by_name["PullAggregate"]
    assert (pull_aggregate.input_type.name, pull_aggregate.output_type.name) == ("AggregateRequest", "AggregateChunk")
    assert not pull_aggregate.client_streaming and pull_aggregate.server_streaming
    assert callable(getattr(lowband_pb2_grpc.CoordinatorServicer, "PullAggregate", None))


def test_every_element_of_the_proto_is_commented() -> None:
    assert generate.uncommented() == []


def test_an_uncommented_element_is_reported(tmp_path: Path) -> None:
    proto = tmp_path / "bare.proto"
    proto.write_text(
        'syntax = "proto3";\n'
        "// A commented message.\n"
        "message Thing {\n"
        "  int32 size = 1;  // A commented field.\n"
        "  string name = 2;\n"
        "}\n"
        "enum Color {\n"
        "  COLOR_UNSPECIFIED = 0;  // Commented.\n"
        "  COLOR_RED = 1;\n"
        "}\n"
    )
    assert generate.uncommented(proto) == ["Thing.name", "Color", "Color.COLOR_RED"]
