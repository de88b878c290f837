"""The `lowband` command line, the Ray launcher and the simulators.

gRPC's core reads GRPC_VERBOSITY once, when grpc is first imported, and at its default level writes its
own copy of errors (a failed bind, a refused TLS handshake) straight to stderr; the command line says each
error in one line instead. Set GRPC_VERBOSITY=ERROR (or DEBUG) in the environment to see the core's log.
"""

import os

os.environ.setdefault("GRPC_VERBOSITY", "NONE")
