"""Per-worker emulated links in the run config (`LinkConfig.for_worker`): an explicit list, a lognormal spread
of bandwidths drawn from the run seed, their validation, and `with_link` giving each worker its own link."""

from __future__ import annotations

import math
import statistics

import pytest

from protocols.base import Update
from protocols.config import ConfigError, LinkConfig, load_config, parse_config
from protocols.replica import Params, Replica
from protocols.settings import WorkerLink
from worker.runners import with_link
from worker.transports.base import Handle, RoundResult, RoundStatus, Transport
from worker.transports.link import Link, LinkModel

# Workers 0-2's bandwidths for bandwidth_mbps 40, sigma 0.8, run seed 11 (computed once, under two hash seeds).
PINNED = [13.947269810508104, 41.22931159373918, 6.505463144699347]


def _cfg(link: dict[str, object], workers: int = 3, seed: int = 0) -> dict[str, object]:
    return {"seed": seed, "cluster": {"workers": workers}, "link": link}


def test_a_list_gives_each_worker_its_entry_and_left_out_fields_come_from_the_top_level() -> None:
    cfg = parse_config(_cfg({
        "bandwidth_mbps": 100, "latency_ms": 20, "jitter_ms": 5, "loss": 0.01,
        "workers": [{"bandwidth_mbps": 10}, {}, {"latency_ms": 150, "jitter_ms": 0, "loss": 0.1}],
    }))
    assert cfg.link is not None
    assert [cfg.link.for_worker(i, cfg.seed) for i in range(3)] == [
        WorkerLink(bandwidth_mbps=10, latency_ms=20, jitter_ms=5, loss=0.01),
        WorkerLink(bandwidth_mbps=100, latency_ms=20, jitter_ms=5, loss=0.01),
        WorkerLink(bandwidth_mbps=100, latency_ms=150, jitter_ms=0, loss=0.1),  # an explicit 0 is not "left out"
    ]
    # A replacement that joins with a higher index takes a slot of the list rather than failing.
    assert cfg.link.for_worker(4, cfg.seed) == cfg.link.for_worker(1, cfg.seed)
    with pytest.raises(ValueError, match="index must be >= 0"):
        cfg.link.for_worker(-1, cfg.seed)


def test_the_single_block_is_every_workers_link() -> None:
    link = LinkConfig(bandwidth_mbps=50, latency_ms=10)
    assert {link.for_worker(i, seed) for i in range(5) for seed in (0, 7)} == {WorkerLink(50, 10, 0, 0)}


@pytest.mark.parametrize(("entries", "workers"), [(2, 3), (4, 3), (1, 4)])
def test_a_list_that_does_not_match_the_cluster_size_is_refused_naming_link_workers(entries: int, workers: int) -> None:
    with pytest.raises(ConfigError, match=rf"link\.workers has {entries} entries but cluster\.workers is {workers}"):
        parse_config(_cfg({"bandwidth_mbps": 10, "workers": [{}] * entries}, workers=workers))


def test_a_bad_entry_is_refused_naming_its_place() -> None:
    with pytest.raises(ConfigError, match=r"link\.workers\.1\.loss"):
        parse_config(_cfg({"bandwidth_mbps": 10, "workers": [{}, {"loss": 1.5}, {}]}))
    with pytest.raises(ConfigError, match=r"link\.workers\.0\.bandwidth_mbps"):
        parse_config(_cfg({"bandwidth_mbps": 10, "workers": [{"bandwidth_mbps": 0}, {}, {}]}))
    with pytest.raises(ConfigError, match=r"link\.workers\.2\.bandwith"):  # a typo is not silently ignored
        parse_config(_cfg({"bandwidth_mbps": 10, "workers": [{}, {}, {"bandwith": 1}]}))
    with pytest.raises(ConfigError, match=r"link\.bandwidth_lognormal_sigma"):
        parse_config(_cfg({"bandwidth_mbps": 10, "bandwidth_lognormal_sigma": -0.1}))


def test_a_list_and_a_lognormal_spread_together_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"link\.workers and link\.bandwidth_lognormal_sigma cannot be combined"):
        parse_config(_cfg({"bandwidth_mbps": 10, "bandwidth_lognormal_sigma": 0.5, "workers": [{}, {}, {}]}))
    # sigma 0 is "no spread": a list next to it is fine.
    parse_config(_cfg({"bandwidth_mbps": 10, "bandwidth_lognormal_sigma": 0.0, "workers": [{}, {}, {}]}))


def test_lognormal_bandwidths_are_fixed_by_the_seed_and_spread_by_sigma() -> None:
    sigma, median, n = 0.8, 40.0, 4000
    link = LinkConfig(bandwidth_mbps=median, latency_ms=30, bandwidth_lognormal_sigma=sigma)
    drawn = [link.for_worker(i, seed=11) for i in range(n)]
    assert all((w.latency_ms, w.jitter_ms, w.loss) == (30, 0, 0) for w in drawn)  # only bandwidth varies
    bandwidths = [w.bandwidth_mbps for w in drawn]
    # Deterministic: the same seed gives the same numbers (as in another process: the generator is seeded by
    # the run seed alone, not by the process's hash salt), and worker i's draw does not depend on how many
    # workers there are; another seed gives others.
    assert [link.for_worker(i, seed=11).bandwidth_mbps for i in (0, 1, 2)] == bandwidths[:3]
    assert link.for_worker(2, seed=11).bandwidth_mbps == bandwidths[2]
    assert [link.for_worker(i, seed=12).bandwidth_mbps for i in range(3)] != bandwidths[:3]
    assert len(set(bandwidths)) == n
    # log(bandwidth / median) = sigma * z: median ~ bandwidth_mbps, standard deviation of the log ~ sigma.
    logs = [math.log(b / median) for b in bandwidths]
    assert statistics.median(bandwidths) == pytest.approx(median, rel=0.06)
    assert statistics.mean(logs) == pytest.approx(0.0, abs=4 * sigma / math.sqrt(n))
    assert statistics.stdev(logs) == pytest.approx(sigma, rel=0.05)
    # Standard normal z: about 68% within one sigma.
    assert sum(abs(x) < sigma for x in logs) / n == pytest.approx(0.683, abs=0.03)


def test_lognormal_bandwidths_are_pinned_numbers() -> None:
    """The draws are a function of the seed alone: these numbers hold in every process and every run (a
    generator seeded from Python's salted str hash, or from global state, would break them)."""
    link = LinkConfig(bandwidth_mbps=40, bandwidth_lognormal_sigma=0.8)
    assert [link.for_worker(i, 11).bandwidth_mbps for i in range(3)] == pytest.approx(PINNED, rel=1e-12)


def test_the_single_block_override_still_parses() -> None:
    cfg = load_config(None, ["link.bandwidth_mbps=100"])
    assert cfg.link == LinkConfig(bandwidth_mbps=100)
    assert cfg.link.workers is None and cfg.link.bandwidth_lognormal_sigma == 0.0
    spread = load_config(None, ["link.bandwidth_mbps=100", "link.bandwidth_lognormal_sigma=0.5"])
    assert spread.link is not None and spread.link.bandwidth_lognormal_sigma == 0.5
    with pytest.raises(ConfigError, match=r"link\.bandwidth_mbps"):
        load_config(None, ["link.latency_ms=10"])  # a link needs a bandwidth


class Idle(Transport):
    """Never called: what is under test is which link `with_link` puts in front of it."""

    worker_id = "w"

    def start(self, params: Params, base_digest: str = "") -> Replica:
        raise NotImplementedError

    def status(self, after_round: int) -> RoundStatus:
        raise NotImplementedError

    def exchange(self, round_: int, update: Update, metrics: dict[str, float]) -> Handle[RoundResult]:
        raise NotImplementedError

    def resync(self) -> Replica:
        raise NotImplementedError


def test_with_link_gives_each_worker_its_own_link() -> None:
    listed = parse_config(_cfg({"bandwidth_mbps": 100, "latency_ms": 5,
                                "workers": [{"bandwidth_mbps": 1}, {"bandwidth_mbps": 2, "loss": 0.2}, {}]}))
    models = []
    for i in range(3):
        wrapped = with_link(Idle(), listed, i)
        assert isinstance(wrapped, Link)
        models.append(wrapped.model)
    assert models == [LinkModel(1, 5), LinkModel(2, 5, loss=0.2), LinkModel(100, 5)]
    assert models[1].bytes_per_s == 2e6 / 8  # the emulation runs at worker 1's own rate

    spread = parse_config({"seed": 5, "link": {"bandwidth_mbps": 20, "bandwidth_lognormal_sigma": 1.0}})
    assert spread.link is not None
    got = [with_link(Idle(), spread, i) for i in range(4)]
    assert [w.model.bandwidth_mbps for w in got if isinstance(w, Link)] == [
        spread.link.for_worker(i, 5).bandwidth_mbps for i in range(4)]
    assert len({w.model.bandwidth_mbps for w in got if isinstance(w, Link)}) == 4
