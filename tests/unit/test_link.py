"""The WAN emulation wrapper (worker/transports/link.py) on a simulated clock: transfer times follow from the
bytes the wrapped transport moved, per direction, with latency, jitter bounds and loss."""

from __future__ import annotations

import pytest
import torch

from compression.payload import dense
from protocols.base import Aggregate, Update
from protocols.config import ConfigError, load_config
from protocols.replica import Params, Replica
from worker.link_hook import LinkHook, ring_allreduce_bytes
from worker.runners import with_link
from worker.transports.base import Handle, RoundResult, RoundStatus, Transport
from worker.transports.link import Link, LinkModel, TokenBucket


class SimClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class CountingTransport(Transport):
    """Moves no data: counts the bytes a real transport would have for each call (a stand-in for the
    wrapped transport; what is under test is the wrapper's timing)."""

    def __init__(self, up: int, down: int) -> None:
        self.worker_id, self.up, self.down = "w0", up, down

    def start(self, params: Params, base_digest: str = "") -> Replica:
        self._received += self.down
        return Replica(0, params)

    def status(self, after_round: int) -> RoundStatus:
        return RoundStatus(after_round + 1, False, "")

    def exchange(self, round_: int, update: Update, metrics: dict[str, float]) -> Handle[RoundResult]:
        self._sent += self.up
        self._received += self.down
        return Handle.completed(RoundResult(True, Aggregate(round_), ""))

    def resync(self) -> Replica:
        self._received += self.down
        return Replica(0, {})


def _link(model: LinkModel, up: int, down: int) -> tuple[Link, SimClock]:
    clock = SimClock()
    return Link(CountingTransport(up, down), model, clock=clock, sleep=clock.sleep), clock


def _update(nbytes: int) -> Update:
    return Update({"x": dense(torch.zeros(nbytes // 4))})


def test_an_exchange_takes_its_bytes_over_the_bandwidth_plus_latency_each_way() -> None:
    # 8 Mbit/s = 1e6 bytes/s each way; 10 ms one-way latency.
    link, clock = _link(LinkModel(bandwidth_mbps=8, latency_ms=10), up=500_000, down=250_000)
    result = link.exchange(0, _update(500_000), {}).result()
    assert result.accepted
    assert clock.now == pytest.approx(0.5 + 0.010 + 0.25 + 0.010)
    assert (link.bytes_sent, link.bytes_received) == (500_000, 250_000)  # counters are the transport's own
    assert link.delayed_s == pytest.approx(clock.now)


def test_loss_resends_and_jitter_stays_within_its_bound() -> None:
    link, clock = _link(LinkModel(bandwidth_mbps=8, loss=0.5), up=0, down=100_000)
    link.resync()
    assert clock.now == pytest.approx(0.2)  # half the packets lost: twice the bytes on the link
    for seed in range(5):
        jittery = Link(CountingTransport(0, 0), LinkModel(8, latency_ms=20, jitter_ms=10), seed=seed,
                       clock=(c := SimClock()), sleep=c.sleep)
        jittery.inner.down = 1_000  # type: ignore[attr-defined]
        jittery.resync()
        assert 0.001 + 0.020 <= c.now <= 0.001 + 0.030


def test_a_direction_queues_transfers_and_the_other_direction_does_not_wait() -> None:
    clock = SimClock()
    bucket = TokenBucket(rate=1000.0, clock=clock)
    assert bucket.reserve(500) == pytest.approx(0.5)
    assert bucket.reserve(500) == pytest.approx(1.0)  # behind the first
    clock.now = 3.0
    assert bucket.reserve(100) == pytest.approx(3.1)  # an idle link starts now
    link, sim = _link(LinkModel(bandwidth_mbps=0.008), up=1_000, down=1_000)  # 1000 bytes/s each way
    link.exchange(0, _update(1_000), {}).result()
    assert sim.now == pytest.approx(2.0)  # up then down: the reply can only come after the update arrived


def test_calls_that_move_nothing_are_not_delayed() -> None:
    link, clock = _link(LinkModel(bandwidth_mbps=1, latency_ms=50), up=0, down=0)
    link.status(0)
    assert clock.now == 0.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"bandwidth_mbps": 0}, "bandwidth_mbps must be > 0"), ({"bandwidth_mbps": 1, "latency_ms": -1}, "latency_ms"),
     ({"bandwidth_mbps": 1, "loss": 1.0}, r"loss must be in \[0, 1\)")],
)
def test_a_bad_link_is_refused_naming_the_field(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LinkModel(**kwargs)


def test_a_run_with_a_link_block_wraps_every_workers_transport() -> None:
    inner = CountingTransport(0, 0)
    plain = load_config(None, [])
    assert with_link(inner, plain, 0) is inner
    cfg = load_config(None, ["link.bandwidth_mbps=50", "link.latency_ms=20"])
    wrapped = with_link(inner, cfg, 3)
    assert isinstance(wrapped, Link) and wrapped.inner is inner
    assert wrapped.model == LinkModel(bandwidth_mbps=50, latency_ms=20)
    with pytest.raises(ConfigError, match=r"link\.bandwidth_mbps"):
        load_config(None, ["link.bandwidth_mbps=0"])


class Bucket:
    """What the DDP hook reads of a `dist.GradBucket`: its flat gradient buffer."""

    def __init__(self, numel: int) -> None:
        self._buffer = torch.ones(numel)

    def buffer(self) -> torch.Tensor:
        return self._buffer


def _summed(bucket: Bucket) -> torch.futures.Future[torch.Tensor]:
    """Stands in for the collective (the hook's subject is the hold after it): the buffer, all-reduced."""
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    fut.set_result(bucket.buffer() * 3)
    return fut


def _hook(model: LinkModel, world_size: int, allreduce=_summed, seed: int = 0) -> tuple[LinkHook, SimClock]:  # type: ignore[no-untyped-def]
    clock = SimClock()
    return LinkHook(model, world_size, seed=seed, allreduce=allreduce, clock=clock, sleep=clock.sleep), clock


def test_the_ddp_hook_holds_a_bucket_for_its_ring_bytes_and_hops_on_the_link() -> None:
    # 1e6 bytes/s each way, 10 ms a hop, 20% loss; a 1 MB bucket over 4 ranks: each rank sends (and receives)
    # 2 * 3/4 MB = 1.5 MB, 1.875 MB on the wire with resends, in 2 * 3 = 6 ring steps.
    model = LinkModel(bandwidth_mbps=8, latency_ms=10, loss=0.2)
    hook, clock = _hook(model, world_size=4)
    bucket = Bucket(250_000)  # float32
    out = hook.hook(None, bucket).wait()  # type: ignore[arg-type]
    assert torch.equal(out, torch.full((250_000,), 3.0))  # the all-reduce's result, untouched
    expected = model.wire_bytes(round(ring_allreduce_bytes(1_000_000, 4))) / 1e6 + 6 * 0.010
    assert expected == pytest.approx(1.935)
    assert clock.now == pytest.approx(expected)
    assert hook.delayed_s == pytest.approx(expected)
    hook.close()


def test_the_ddp_hooks_buckets_queue_on_the_link_and_one_rank_is_never_held() -> None:
    hook, clock = _hook(LinkModel(bandwidth_mbps=8, latency_ms=10), world_size=2)
    # Two 500 kB buckets reaching the link together: the second's bytes wait for the first's (latency does not).
    assert hook.done_at(500_000) == pytest.approx(0.5 + 0.020)
    assert hook.done_at(500_000) == pytest.approx(1.0 + 0.020)
    for seed in range(5):
        jittery, _ = _hook(LinkModel(bandwidth_mbps=8, latency_ms=10, jitter_ms=5), world_size=2, seed=seed)
        assert 0.001 + 0.020 <= jittery.done_at(1_000) <= 0.001 + 0.030  # two hops, each within its jitter
        jittery.close()
    hook.close()
    alone, clock = _hook(LinkModel(bandwidth_mbps=0.001, latency_ms=100), world_size=1)
    assert torch.equal(alone.hook(None, Bucket(1000)).wait(), torch.full((1000,), 3.0))  # type: ignore[arg-type]
    assert clock.now == 0.0 and alone.delayed_s == 0.0
    alone.close()


def test_a_failed_all_reduce_fails_the_ddp_step_instead_of_hanging_it() -> None:
    def broken(bucket: Bucket) -> torch.futures.Future[torch.Tensor]:
        fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
        fut.set_exception(RuntimeError("peer gone"))
        return fut

    hook, _ = _hook(LinkModel(bandwidth_mbps=8), world_size=2, allreduce=broken)
    with pytest.raises(RuntimeError, match="peer gone"):
        hook.hook(None, Bucket(10)).wait()  # type: ignore[arg-type]
    hook.close()
