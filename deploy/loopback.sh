#!/bin/sh
# Run a command inside a fresh network namespace that has only loopback, so that nothing it starts
# (Ray, gRPC servers, gloo) can reach or bind another address. As root a plain network namespace; as
# another user, one inside a user namespace (where the kernel allows it). Falls back to running the
# command as-is, with a warning, where no working namespace can be made.
# Inside, deploy/netns.py brings lo up and names the host localhost (Ray and gloo resolve the hostname
# for their own address), and gloo is pinned to lo (GLOO_SOCKET_IFNAME).
setup="$(dirname "$0")/netns.py"
inner='python3 "$0" || { echo "loopback.sh: the namespace could not be set up" >&2; exit 1; }
GLOO_SOCKET_IFNAME=lo exec "$@"'
if command -v unshare >/dev/null 2>&1 && command -v python3 >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && unshare -n -u python3 "$setup" 2>/dev/null; then
    exec unshare -n -u sh -c "$inner" "$setup" "$@"
  fi
  if unshare -r -n -u python3 "$setup" 2>/dev/null; then
    exec unshare -r -n -u sh -c "$inner" "$setup" "$@"
  fi
fi
echo "loopback.sh: cannot make a loopback-only network namespace here; running without isolation" >&2
exec "$@"
