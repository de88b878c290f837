"""WAN emulation around any transport: the bytes a transport really moved, delayed as a slow link would.

`Link(transport, model)` forwards every call to the transport it wraps and, after each, holds the caller
for as long as the bytes that call moved would take on the emulated link: one token bucket per direction
(the link is full duplex: uploads and downloads do not queue behind each other) at `bandwidth_mbps`, plus
`latency_ms` (and `jitter_ms`, uniform) per transfer. `loss` is the fraction of packets lost; a reliable
transport resends them, so the bytes on the link grow by 1 / (1 - loss). The counters stay those of the
wrapped transport: emulation changes when bytes arrive, not how many.

Why not a library: the emulation must act on the bytes this transport counts, in this process, whatever
carries them (gRPC, gloo, in-process); kernel shaping (`tc netem`) needs root and veth pairs.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

from protocols.base import Update
from protocols.config import RunConfig
from protocols.replica import Params, Replica
from worker.traffic import Traffic
from worker.transports.base import Handle, RoundResult, RoundStatus, Transport


@dataclass(frozen=True)
class LinkModel:
    """One worker's link: megabits per second each way, one-way latency and its jitter in ms, loss fraction."""

    bandwidth_mbps: float
    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    loss: float = 0.0

    def __post_init__(self) -> None:
        if not self.bandwidth_mbps > 0:
            raise ValueError(f"link bandwidth_mbps must be > 0, got {self.bandwidth_mbps}")
        if self.latency_ms < 0 or self.jitter_ms < 0:
            raise ValueError(f"link latency_ms and jitter_ms must be >= 0, got {self.latency_ms}, {self.jitter_ms}")
        if not 0 <= self.loss < 1:
            raise ValueError(f"link loss must be in [0, 1), got {self.loss}")

    @property
    def bytes_per_s(self) -> float:
        return self.bandwidth_mbps * 1e6 / 8

    def wire_bytes(self, nbytes: int) -> float:
        """Bytes the link carries for `nbytes` of payload: lost packets are sent again."""
        return nbytes / (1.0 - self.loss)


def worker_link(cfg: RunConfig, index: int) -> tuple[LinkModel, int] | None:
    """Worker `index`'s emulated link in run `cfg` (`LinkConfig.for_worker`) and the seed of its own jitter
    stream; None when the run has no `link:` block."""
    if cfg.link is None:
        return None
    return LinkModel(**asdict(cfg.link.for_worker(index, cfg.seed))), cfg.seed * 1009 + index


class TokenBucket:
    """A direction of the link: transfers queue behind each other at `rate` bytes/s; `reserve` returns when
    (on `clock`) a transfer of n bytes that starts now would have finished."""

    def __init__(self, rate: float, clock: Callable[[], float]) -> None:
        self.rate, self.clock = rate, clock
        self._free_at = 0.0  # when the bytes already on the link will have drained
        self._lock = threading.Lock()

    def reserve(self, nbytes: float) -> float:
        with self._lock:
            start = max(self.clock(), self._free_at)
            self._free_at = start + nbytes / self.rate
            return self._free_at


# The metrics an update through a `Link` carries, so the aggregator can tell which link a worker is on.
LINK_BANDWIDTH_METRIC = "link_bandwidth_mbps"
LINK_LATENCY_METRIC = "link_latency_ms"


class Link(Transport):
    """`transport` seen through `model`: see the module docstring."""

    def __init__(
        self,
        transport: Transport,
        model: LinkModel,
        seed: int = 0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.inner, self.model, self.clock, self.sleep = transport, model, clock, sleep
        self.up = TokenBucket(model.bytes_per_s, clock)
        self.down = TokenBucket(model.bytes_per_s, clock)
        self._rng = random.Random(seed)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="lowband-link")
        self.delayed_s = 0.0  # time callers were held by the emulation, in all

    @property
    def worker_id(self) -> str:  # type: ignore[override]
        return self.inner.worker_id

    @property
    def target_round_s(self) -> float:  # type: ignore[override]
        return self.inner.target_round_s

    @property
    def bytes_sent(self) -> int:
        return self.inner.bytes_sent

    @property
    def bytes_received(self) -> int:
        return self.inner.bytes_received

    @property
    def traffic(self) -> Traffic:
        return self.inner.traffic

    def _hold(self, sent: int, received: int) -> None:
        """Wait until `sent` bytes up and `received` bytes down would have crossed the link."""
        done = self.clock()
        for bucket, nbytes in ((self.up, sent), (self.down, received)):
            if nbytes > 0:
                latency = (self.model.latency_ms + self._rng.uniform(0, self.model.jitter_ms)) / 1e3
                done = max(done, bucket.reserve(self.model.wire_bytes(nbytes)) + latency)
        wait = done - self.clock()
        if wait > 0:
            self.delayed_s += wait
            self.sleep(wait)

    def _through(self, call: Callable[[], object]) -> object:
        sent, received = self.inner.bytes_sent, self.inner.bytes_received
        value = call()
        self._hold(self.inner.bytes_sent - sent, self.inner.bytes_received - received)
        return value

    def start(self, params: Params, base_digest: str = "") -> Replica:
        replica = self._through(lambda: self.inner.start(params, base_digest))
        assert isinstance(replica, Replica)
        return replica

    def status(self, after_round: int) -> RoundStatus:
        status = self._through(lambda: self.inner.status(after_round))
        assert isinstance(status, RoundStatus)
        return status

    def exchange(self, round_: int, update: Update, metrics: dict[str, float]) -> Handle[RoundResult]:
        """The update's payload crosses the uplink before the aggregator sees it; what else moved (headers,
        polls) and the aggregate coming down are held for after. The metrics name the link (the coordinator's
        status view shows it)."""
        metrics = {**metrics, LINK_BANDWIDTH_METRIC: self.model.bandwidth_mbps,
                   LINK_LATENCY_METRIC: self.model.latency_ms}

        def delayed() -> RoundResult:
            sent, received = self.inner.bytes_sent, self.inner.bytes_received
            ahead = update.nbytes()
            self._hold(ahead, 0)
            result = self.inner.exchange(round_, update, metrics).result()
            self._hold(max(0, self.inner.bytes_sent - sent - ahead), self.inner.bytes_received - received)
            return result

        return Handle(self._pool.submit(delayed))

    def resync(self) -> Replica:
        replica = self._through(self.inner.resync)
        assert isinstance(replica, Replica)
        return replica

    def report(self, step: int, loss: float | None, eval_loss: float | None) -> None:
        self.inner.report(step, loss, eval_loss)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.inner.close()
