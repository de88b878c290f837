"""Transports: how a worker's update reaches the aggregator and the round's aggregate comes back.

One file per transport: `grpc` (star through the coordinator; workers only dial out), `allgather`
(torch collectives; every rank aggregates), `inproc` (the coordinator's state machine in this process).
`worker/loop.py` drives any of them through the `Transport` interface of `base.py`.
"""
