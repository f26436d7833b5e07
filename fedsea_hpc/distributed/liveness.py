"""Slow is not dead: a peer is lost when its heartbeat stops, not when a wait is long.

Every rank runs one daemon thread with its own client connection to the rendezvous store
(the TCPStore of ``init_process_group``, hosted by rank 0). Each beat it adds 1 to its own
counter ``fedsea/hb/<rank>`` and reads everyone else's. A counter that has not moved for
``comm.timeout_s`` seconds of this rank's clock names a lost rank: the thread prints
``[rank r] fatal: lost rank p: no heartbeat for N s`` and ends the process, so the launcher
takes the job down. A store that does not answer for ``comm.timeout_s`` means rank 0 (its host)
is gone. A rank that finishes marks ``fedsea/done/<rank>`` first, so an early finisher is never
mistaken for a dead one.

The thread only sleeps and talks to the store, so it keeps beating while its rank computes,
waits on a peer, writes a checkpoint or decodes tokens for minutes (torch releases the GIL in
those). Waits themselves are bounded by ``comm.max_wait_s`` (0 = no bound), the net for a peer
that is alive but never sends.

A process that exits is usually noticed sooner, through its closed connections; the heartbeat
covers what a socket does not show: a frozen process (SIGSTOP, a swapped-out or hung node) and
a host that vanished without closing anything.
"""
from __future__ import annotations

import os
import threading
import time
from datetime import timedelta
from typing import Callable

from fedsea_hpc.distributed.env import say

HB, DONE = "fedsea/hb/", "fedsea/done/"


def beat_interval(timeout_s: float) -> float:
    """Seconds between beats: a fifth of the detection time, at most 1 s."""
    return min(1.0, timeout_s / 5)


class Watch:
    """Which peers have gone quiet; pure bookkeeping, fed with counter readings and times."""

    def __init__(self, peers: list[int], timeout_s: float, now: float):
        self.timeout_s = timeout_s
        self.last = {p: (-1, now) for p in peers}  # peer: (counter, when it last moved)

    def see(self, peer: int, counter: int, now: float) -> None:
        if counter != self.last[peer][0]:
            self.last[peer] = (counter, now)

    def forget(self, peer: int) -> None:
        self.last.pop(peer, None)

    def lost(self, now: float) -> list[tuple[int, float]]:
        """``(peer, seconds since its counter moved)`` for every peer quiet for longer than the timeout."""
        return [(p, now - t) for p, (_, t) in sorted(self.last.items()) if now - t > self.timeout_s]


class Heartbeat:
    def __init__(self, rank: int, world_size: int, timeout_s: float, *, host: str, port: int,
                 on_lost: Callable[[str], None] | None = None):
        import torch.distributed as dist

        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        self.interval = beat_interval(timeout_s)
        self.on_lost = on_lost or _die
        self.store = dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=timeout_s),
                                   wait_for_workers=False)
        self.store.add(HB + str(rank), 1)
        self._stop = threading.Event()
        self.watch = Watch([p for p in range(world_size) if p != rank], timeout_s, time.monotonic())
        self.last_ok = time.monotonic()  # the end of the last store round that answered
        self.thread = threading.Thread(target=self._run, name="fedsea-heartbeat", daemon=True)
        self.thread.start()
        # A store call may block past its own timeout (a host whose interface went down leaves
        # TCP retrying): a second thread watches the first one's progress.
        self.guard = threading.Thread(target=self._guard, name="fedsea-heartbeat-guard", daemon=True)
        self.guard.start()

    def _guard(self) -> None:
        limit = self.timeout_s + 2 * self.interval
        while not self._stop.wait(self.interval):
            quiet = time.monotonic() - self.last_ok
            if quiet > limit and not self._stop.is_set():
                self.on_lost(f"[rank {self.rank}] fatal: lost rank 0: the rendezvous store it hosts has not "
                             f"answered for {quiet:.0f} s (comm.timeout_s={self.timeout_s:g}; a store call is stuck)")
                return

    def _run(self) -> None:
        store_quiet_since = None
        while not self._stop.wait(self.interval):
            try:
                self.store.add(HB + str(self.rank), 1)
                for p in list(self.watch.last):
                    if self.store.add(DONE + str(p), 0):
                        self.watch.forget(p)
                    else:
                        self.watch.see(p, self.store.add(HB + str(p), 0), time.monotonic())
                store_quiet_since = None
                self.last_ok = time.monotonic()
            except Exception as e:  # noqa: BLE001 - any store failure: rank 0 (the host) may be gone
                now = time.monotonic()
                store_quiet_since = store_quiet_since or now
                if self._stop.is_set():
                    return
                if now - store_quiet_since > self.timeout_s:
                    self.on_lost(f"[rank {self.rank}] fatal: lost rank 0: the rendezvous store it hosts has not "
                                 f"answered for {now - store_quiet_since:.0f} s (comm.timeout_s={self.timeout_s:g}): {e}")
                    return
                continue
            if self._stop.is_set():
                return
            lost = self.watch.lost(time.monotonic())
            if lost:
                who = ", ".join(f"rank {p} (no heartbeat for {s:.0f} s)" for p, s in lost)
                self.on_lost(f"[rank {self.rank}] fatal: lost {who}; comm.timeout_s={self.timeout_s:g}")
                return

    def stop(self) -> None:
        """This rank is done: say so to the others, then stop beating."""
        if self._stop.is_set():
            return
        self._stop.set()
        try:
            self.store.add(DONE + str(self.rank), 1)
        except Exception:  # noqa: BLE001 - the store host may have finished first
            pass
        self.thread.join(timeout=self.interval + 5)
        self.guard.join(timeout=self.interval + 1)


def _die(message: str) -> None:
    say(message)
    os._exit(1)


_current: Heartbeat | None = None


def start(rank: int, world_size: int, timeout_s: float) -> Heartbeat:
    """Start this rank's heartbeat against the store at ``MASTER_ADDR:MASTER_PORT``."""
    global _current
    _current = Heartbeat(rank, world_size, timeout_s, host=os.environ["MASTER_ADDR"],
                         port=int(os.environ["MASTER_PORT"]))
    return _current


def stop() -> None:
    global _current
    if _current is not None:
        _current.stop()
        _current = None
