"""bench/perf_profile.py: perf report's rows are read with their sample counts, and shared objects fall in their
groups (the coordinator-scale bench sums them per worker)."""

from __future__ import annotations

from bench.perf_profile import group_of, parse_report

# The head of a real `perf report --sort dso --stdio --show-nr-samples` (the coordinator at 100 workers).
REPORT = """# Total Lost Samples: 0
#
# Samples: 2K of event 'cpu-clock:pppH'
# Event count (approx.): 4645290544
#
# Overhead       Samples  Shared Object
# ........  ............  .................................................
#
    44.82%          1039  [kernel.kallsyms]
    34.30%           795  libpython3.11.so.1.0
     6.17%           143  libc.so.6
     3.36%            78  cygrpc.cpython-311-x86_64-linux-gnu.so
     0.04%             1  [unknown]
"""


def test_rows_are_read_with_their_samples_and_comments_skipped() -> None:
    assert parse_report(REPORT) == [("[kernel.kallsyms]", 1039), ("libpython3.11.so.1.0", 795), ("libc.so.6", 143),
                                    ("cygrpc.cpython-311-x86_64-linux-gnu.so", 78), ("[unknown]", 1)]


def test_a_symbol_row_keeps_its_kind_mark() -> None:
    assert parse_report("    26.57%           616  [k] finish_task_switch.isra.0\n") == [
        ("[k] finish_task_switch.isra.0", 616)]


def test_shared_objects_fall_in_their_groups() -> None:
    names = ["[kernel.kallsyms]", "libpython3.11.so.1.0", "libc.so.6", "ld-linux-x86-64.so.2", "libtorch_cpu.so",
             "libc10.so", "cygrpc.cpython-311-x86_64-linux-gnu.so", "_message.abi3.so", "[unknown]"]
    assert [group_of(n) for n in names] == ["kernel", "python", "libc", "libc", "torch", "torch", "grpc", "grpc",
                                            "other"]
