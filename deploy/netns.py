"""Set up the inside of a fresh loopback-only network namespace: bring `lo` up and name the host `localhost`.

    python3 deploy/netns.py     # run by deploy/loopback.sh inside `unshare -n -u`; stdlib only

A new network namespace starts with `lo` down, so nothing could reach 127.0.0.1. This does with ioctls what
`ip link set lo up` does, so the namespace works on machines without iproute2. Ray and gloo resolve the
hostname when they cannot reach the internet; inside the namespace only loopback exists, so the hostname
must resolve there too (Ray otherwise waits forever for its own GCS on an address that is not there).
Exits 1, naming what failed, when `lo` cannot be brought up: loopback.sh then runs without isolation.
"""

from __future__ import annotations

import fcntl
import socket
import struct
import sys

# From <linux/sockios.h> and <net/if.h>; the struct is `struct ifreq`: a 16-byte name, then the flags.
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
IFREQ = "16sH22x"


def bring_interface_up(name: str = "lo") -> None:
    """Set IFF_UP on interface `name`; an OSError names the interface and the reason."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            request = struct.pack(IFREQ, name.encode(), 0)
            _, flags = struct.unpack(IFREQ, fcntl.ioctl(sock, SIOCGIFFLAGS, request))
            if not flags & IFF_UP:
                fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack(IFREQ, name.encode(), flags | IFF_UP))
    except OSError as err:
        raise OSError(err.errno, f"cannot bring interface {name!r} up: {err.strerror}") from err


def main() -> int:
    try:
        bring_interface_up("lo")
    except OSError as err:
        print(f"netns.py: {err.strerror}", file=sys.stderr)
        return 1
    try:
        socket.sethostname("localhost")
    except OSError as err:  # a namespace without its own UTS namespace; Ray may still resolve the old name
        print(f"netns.py: cannot set the hostname to localhost: {err}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
