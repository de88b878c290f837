"""Transports: how a worker's update reaches the aggregator and the round's aggregate comes back.

One file per transport: `grpc` (star through the coordinator; workers only dial out), `allgather`
(torch collectives; every rank aggregates), `inproc` (the coordinator's state machine in this process).
`worker/loop.py` drives any of them through the `Transport` interface of `base.py`.

Gossip has no aggregator and its own seam, `PeerTransport` (`peers.py`), driven by `worker/gossip_loop.py`:
`p2p` (each worker serves the gRPC Peer service, `peer_servicer.py`, and dials its neighbours; the coordinator
only does rendezvous) and `peers_inproc` (every node a thread of one process). Both file incoming messages
in a `PeerInbox` (`peer_inbox.py`) after the same checks (`peer_check.py`).
"""
