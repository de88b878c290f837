"""The coordinator's process moves its start-up objects out of Python's garbage collections, once
(coordinator/collector.py). Run in a fresh interpreter each: freezing is for the whole process."""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = """
import gc, json
from coordinator.collector import freeze_startup
before = gc.get_freeze_count()
first = freeze_startup()
frozen = gc.get_freeze_count()
second = freeze_startup()
print(json.dumps({"before": before, "first": first, "frozen": frozen, "second": second,
                  "after_second": gc.get_freeze_count(), "tracked": len(gc.get_objects())}))
"""


def _probe(code: str) -> dict[str, int]:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_objects_alive_at_start_up_leave_the_collections_once() -> None:
    got = _probe(PROBE)
    assert got["before"] == 0 and got["first"] is True
    assert got["frozen"] > 1000  # the interpreter's and the imports' objects
    assert got["tracked"] < got["frozen"] / 10  # what the collector still walks is what came after
    assert got["second"] is False and got["after_second"] == got["frozen"]  # a second server freezes nothing more


def test_a_coordinator_server_freezes_its_process_as_it_starts() -> None:
    got = _probe("""
import gc, json
from coordinator.server import CoordinatorServer
from tests.conftest import tiny_config
before = gc.get_freeze_count()
server = CoordinatorServer(tiny_config())
try:
    print(json.dumps({"before": before, "frozen": gc.get_freeze_count()}))
finally:
    server.stop()
""")
    assert got["before"] == 0 and got["frozen"] > 1000
