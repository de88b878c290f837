"""`protocol.kind: gossip` with `cluster.transport: inproc`: every node a thread of this process, messages
handed over in memory (worker/transports/peers_inproc.py), the rendezvous as a plain object. For tests,
quick experiments, and simulating more nodes than there are machines.

The rendezvous writes config.yaml and metrics.jsonl into `run_dir`; this module adds checkpoint.pt: the
plain average of the nodes' final models (the model gossip converges to, and the one the theory bounds;
only an in-process run holds every node's model to compute it), readable by `lowband sample`. summary.json
is the caller's, as for every runner.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from coordinator.rendezvous import Rendezvous
from protocols.config import RunConfig
from protocols.gossip.average import network_mean
from worker.gossip_loop import GossipLoop, GossipResult
from worker.loop import Progress
from worker.session import Session
from worker.transports.peers import PeerTransport
from worker.transports.peers_inproc import InprocPeers, InprocPeerTransport

# Wraps node i's transport (fault injection in tests: a link that drops a node's messages); None: as it is.
TransportWrap = Callable[[int, InprocPeerTransport], PeerTransport]


def run_inproc_gossip(
    cfg: RunConfig,
    run_dir: str | Path | None = None,
    progress: Progress | None = None,
    wrap: TransportWrap | None = None,
) -> tuple[dict[str, Any], list[GossipResult]]:
    """Run `cfg` with `cluster.workers` node threads; (the rendezvous' summary, each node's result, by index).
    A node that raised makes this raise RuntimeError naming it, after the others finished."""
    rendezvous = Rendezvous(cfg, run_dir=run_dir)
    hub = InprocPeers(rendezvous, cfg)
    n = cfg.cluster.workers
    # Joined here, in order, so node i has index i (its shard, its place in the graph).
    transports = [hub.transport(f"w{i}") for i in range(n)]
    # Built one by one: each seeds torch's global RNG for its model (threads would interleave the seeding).
    sessions = [Session.build(cfg, t.index, n) for t in transports]
    loops: list[GossipLoop | None] = [None] * n
    errors: list[str] = []

    def work(i: int) -> None:
        transport = wrap(i, transports[i]) if wrap is not None else transports[i]
        try:
            loops[i] = loop = GossipLoop(sessions[i], transport, progress=progress)
            loop.run()
        except BaseException as err:  # reported below, with the node's name
            errors.append(f"node w{i}: {type(err).__name__}: {err}")
        finally:
            transport.close()

    threads = [threading.Thread(target=work, args=(i,), name=f"lowband-gossip-w{i}") for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise RuntimeError("; ".join(errors))
    finished = [loop for loop in loops if loop is not None]
    if rendezvous.run_dir is not None and finished:
        mean = network_mean([loop.final_params for loop in finished])
        sessions[0].save_checkpoint(rendezvous.run_dir.path / "checkpoint.pt", mean, cfg.rounds, rendezvous.run_id)
    summary = rendezvous.summary()
    summary.update(transport="inproc", refused_messages=len(hub.refusals),
                   skipped_messages=sum(loop.result.skipped_messages for loop in finished))
    return summary, [loop.finish() for loop in finished]
