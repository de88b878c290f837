#!/bin/sh
# Run a command inside a fresh network namespace that has only loopback, so that nothing it starts
# (Ray, gRPC servers, gloo) can reach or bind another address. As root a plain network namespace; as
# another user, one inside a user namespace (where the kernel allows it). Falls back to running the
# command as-is, with a warning, where no namespace can be made.
# Ray and gloo pick their address by resolving the machine's hostname when they cannot reach the
# internet, and that address does not exist in the namespace (Ray then waits for its own GCS forever).
# So the namespace also gets its own hostname, localhost, and gloo is pinned to lo (GLOO_SOCKET_IFNAME).
inner='ip link set lo up 2>/dev/null || echo "loopback.sh: could not bring lo up" >&2
python3 -c "import socket; socket.sethostname(\"localhost\")" || echo "loopback.sh: could not set the hostname" >&2
GLOO_SOCKET_IFNAME=lo exec "$@"'
if [ "$(id -u)" = 0 ] && command -v unshare >/dev/null 2>&1 && unshare -n -u true 2>/dev/null; then
  exec unshare -n -u sh -c "$inner" sh "$@"
fi
if command -v unshare >/dev/null 2>&1 && unshare -r -n -u true 2>/dev/null; then
  exec unshare -r -n -u sh -c "$inner" sh "$@"
fi
echo "loopback.sh: cannot make a loopback-only network namespace here; running without isolation" >&2
exec "$@"
