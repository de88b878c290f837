"""The DDP baseline behind an emulated WAN link: a DistributedDataParallel communication hook.

`LinkHook(model, world_size).hook` runs DDP's normal all-reduce of each gradient bucket (torch's
`allreduce_hook`: divide by the world size, sum) and then holds the bucket, so the step, for as long as the
all-reduce's bytes would take on this rank's link (`LinkModel`, `TokenBucket` of worker/transports/link.py):

- Bytes: a ring all-reduce (Patarasuk & Yuan 2009; a reduce-scatter then an all-gather) of B bucket bytes over
  N ranks sends 2 (N - 1) / N * B per rank and receives as many (`ring_allreduce_bytes`), grown by
  1 / (1 - loss) for resent packets. They go through the link's two token buckets (one per direction; the
  link is full duplex), so buckets queue behind each other as transfers do on `Link`.
- Latency: the ring runs 2 (N - 1) steps, each one hop to the next rank, and a step cannot start before the
  previous one arrived: 2 (N - 1) one-way latencies (each plus its own uniform jitter). With the bytes, this
  is the alpha-beta cost of a ring all-reduce, 2 (N - 1) * latency + 2 (N - 1) / N * B / bandwidth. One rank
  (N = 1) moves nothing and is never held.

As `Link` does for a transport, the hold is added after the real all-reduce has finished (the emulated link
is slower than loopback, not faster), and the all-reduced gradients are passed on untouched: the emulation
changes when they arrive, not what they are. The link's clock starts when the real all-reduce completes; the
wait itself runs on a thread of the hook's own, so the autograd thread keeps computing the next buckets'
gradients meanwhile (DDP overlaps communication with the backward pass) and gloo's threads stay free (on a
GPU the all-reduced bucket is synchronized on the host before it is handed to that thread). DDP
waits for every bucket before the optimizer step, so a step ends when its last bucket has crossed the link.
A slow rank's later all-reduces then wait for it, as a real ring waits for its slowest link.

`delayed_s` is the seconds the emulation held this rank's buckets beyond their all-reduce, in all.

No `from __future__ import annotations` here: DDP checks the hook's annotations as objects.
"""

import functools
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from worker.transports.link import LinkModel, TokenBucket

AllReduce = Callable[[dist.GradBucket], torch.futures.Future[torch.Tensor]]


def ring_allreduce_bytes(gradient_bytes: int, world_size: int) -> float:
    """Bytes each rank sends (and receives) to all-reduce `gradient_bytes` over a ring of `world_size`."""
    return 2 * (world_size - 1) / world_size * gradient_bytes


class LinkHook:
    """One rank's emulated link for DDP; register `hook` (see the module docstring).

    `allreduce` is the collective the hook runs before holding (default: torch's `allreduce_hook` on
    `process_group`, None = the default group); `clock` and `sleep` are the emulation's time (tests pass a
    simulated one); `seed` seeds the jitter.
    """

    def __init__(
        self,
        model: LinkModel,
        world_size: int,
        seed: int = 0,
        process_group: dist.ProcessGroup | None = None,
        allreduce: AllReduce | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.model, self.world_size, self.clock, self.sleep = model, world_size, clock, sleep
        self.up = TokenBucket(model.bytes_per_s, clock)
        self.down = TokenBucket(model.bytes_per_s, clock)
        if allreduce is None:  # torch's hook reads a None group as the default one; its annotation does not say so
            allreduce = functools.partial(allreduce_hook, process_group)  # type: ignore[arg-type]
        self._allreduce: AllReduce = allreduce
        self._rng = random.Random(seed)
        self._lock = threading.Lock()  # the jitter stream: completions may arrive on several gloo threads
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="lowband-ddp-link")
        self.delayed_s = 0.0

    def done_at(self, bucket_bytes: int) -> float:
        """When (on `clock`) the ring all-reduce of a `bucket_bytes` bucket that reaches the link now would
        have crossed it; reserves its bytes on both directions."""
        hops = 2 * (self.world_size - 1)
        if bucket_bytes <= 0 or hops == 0:
            return self.clock()
        on_wire = self.model.wire_bytes(round(ring_allreduce_bytes(bucket_bytes, self.world_size)))
        with self._lock:
            latency_ms = sum(self.model.latency_ms + self._rng.uniform(0, self.model.jitter_ms) for _ in range(hops))
        return max(self.up.reserve(on_wire), self.down.reserve(on_wire)) + latency_ms / 1e3

    def hook(self, state: object, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        """DDP communication hook: the bucket all-reduced, delivered once it has crossed the emulated link."""
        buffer = bucket.buffer()
        nbytes = buffer.numel() * buffer.element_size()
        # A future that carries CUDA tensors must name their device; it records events on the streams current
        # where its result is set (the hook's thread), so the collective is finished before it gets there.
        out: torch.futures.Future[torch.Tensor] = (
            torch.futures.Future(devices=[buffer.device]) if buffer.is_cuda else torch.futures.Future()
        )

        def arrived(reduced: torch.futures.Future[torch.Tensor]) -> None:
            try:
                value = reduced.wait()  # on a GPU: the current stream now waits for the collective's kernels
                if value.is_cuda:
                    torch.cuda.current_stream(value.device).synchronize()
                done = self.done_at(nbytes)
                self._pool.submit(self._deliver, out, value, done)
            except Exception as err:  # a failed collective fails the step, not a hidden thread
                out.set_exception(err)  # type: ignore[arg-type]  # torch types it as the result

        self._allreduce(bucket).add_done_callback(arrived)
        return out

    def _deliver(self, out: torch.futures.Future[torch.Tensor], value: torch.Tensor, done: float) -> None:
        try:
            wait = done - self.clock()
            if wait > 0:
                self.delayed_s += wait
                self.sleep(wait)
        except Exception as err:  # never leave DDP waiting on a bucket that will not come
            out.set_exception(err)  # type: ignore[arg-type]  # torch types it as the result
            return
        out.set_result(value)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
