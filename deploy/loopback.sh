#!/bin/sh
# Run a command inside a fresh network namespace that has only loopback, so that nothing it starts
# (Ray, gRPC servers) can reach or bind another address. Falls back to running it as-is, with a
# warning, where no namespace can be made (not root, or unshare not permitted).
if [ "$(id -u)" = 0 ] && command -v unshare >/dev/null 2>&1 && unshare -n true 2>/dev/null; then
  exec unshare -n sh -c 'ip link set lo up 2>/dev/null || python3 -c "pass"; exec "$@"' sh "$@"
fi
echo "loopback.sh: cannot make a loopback-only network namespace here; running without isolation" >&2
exec "$@"
