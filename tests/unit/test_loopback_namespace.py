"""deploy/loopback.sh and deploy/netns.py: the namespace `make test` and `make run` put everything in."""

from __future__ import annotations

import errno
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from deploy.netns import bring_interface_up

LOOPBACK_SH = Path(__file__).resolve().parents[2] / "deploy" / "loopback.sh"
NO_ISOLATION = "running without isolation"

# What the command sees inside: its interfaces, hostname and gloo pin, and whether 127.0.0.1 carries TCP.
PROBE = """
import json, os, socket
server = socket.create_server(("127.0.0.1", 0))
client = socket.create_connection(server.getsockname(), timeout=5)
client.close()
print(json.dumps({"interfaces": [name for _, name in socket.if_nameindex()],
                  "hostname": socket.gethostname(),
                  "gloo": os.environ.get("GLOO_SOCKET_IFNAME")}))
"""


def through_loopback_sh(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(LOOPBACK_SH), *command], capture_output=True, text=True, timeout=60)


def test_the_command_sees_only_a_working_lo_and_the_hostname_localhost() -> None:
    done = through_loopback_sh(sys.executable, "-c", PROBE)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    if NO_ISOLATION in done.stderr:
        # No namespace can be made on this machine: the command must still run, in the host's network.
        assert seen["hostname"] == socket.gethostname()
    else:
        assert seen == {"interfaces": ["lo"], "hostname": "localhost", "gloo": "lo"}


def test_arguments_and_exit_status_pass_through_unchanged() -> None:
    done = through_loopback_sh(sys.executable, "-c", "import sys; print(sys.argv[1:]); sys.exit(7)", "a b", "", "$HOME")
    assert done.returncode == 7
    assert done.stdout.strip() == str(["a b", "", "$HOME"])


def test_an_interface_that_does_not_exist_is_an_error_naming_it() -> None:
    with pytest.raises(OSError) as raised:
        bring_interface_up("nosuchif0")
    assert raised.value.errno == errno.ENODEV
    assert "'nosuchif0'" in str(raised.value)
