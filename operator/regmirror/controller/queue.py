"""A work queue with client-go's semantics, for asyncio (no maintained Python port exists).

- A key waiting in the queue is there once, however often it is added (dedupe).
- A key being processed is never handed to a second worker; added meanwhile,
  it is processed again once the first worker calls `done` (nothing is lost).
- `add_after` delays a key; the earliest pending time wins.
- `add_rate_limited` delays a key exponentially per failure (base * 2^n, capped)
  until `forget` resets it, so a key that keeps failing never spins.
- Two priorities: the singleton keys (node plan, rollout accounting, host
  order) overtake a backlog of per-mirror keys. A per-mirror key added as
  `urgent` joins them for its next turn (a status that can flip Ready when a
  node rollout completes must not wait behind hundreds of progress passes).

Everything runs on one event loop: no locks.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import time
from collections import deque
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)

HIGH = 0
NORMAL = 1


class ShutDown(Exception):
    """The queue was shut down while a worker waited for a key."""


class WorkQueue(Generic[K]):
    """Deduplicating, rate-limited, delaying work queue with two priorities."""

    def __init__(
        self,
        *,
        base_delay: float = 0.5,
        max_delay: float = 300.0,
        priority: Callable[[K], int] = lambda _key: NORMAL,
        clock: Callable[[], float] = time.monotonic,
        on_take: Callable[[K, float], None] = lambda _key, _seconds: None,
    ) -> None:
        self.base_delay = base_delay
        self.max_delay = max_delay
        self._priority = priority
        self._clock = clock
        self._on_take = on_take  # (key, seconds it waited since it was ready): client-go's queue_duration
        self._ready: tuple[deque[K], deque[K]] = (deque(), deque())
        self._queued: set[K] = set()  # in a ready deque, or to be re-queued when processing ends
        self._processing: set[K] = set()
        self._delayed: list[tuple[float, int, K]] = []  # heap of (due, seq, key)
        self._due: dict[K, float] = {}  # earliest pending time per delayed key
        self._seq = itertools.count()
        self._failures: dict[K, int] = {}
        self._urgent: set[K] = set()  # handed out with the high priority next time
        self._ready_since: dict[K, float] = {}  # when each key in a ready deque became ready
        self._wakeup = asyncio.Event()
        self._shutdown = False

    # ------------------------------------------------------------ adding

    def add(self, key: K, *, urgent: bool = False) -> None:
        """Queue a key now (no-op if it is already waiting, except that `urgent` moves it up)."""
        if self._shutdown:
            return
        if urgent:
            self._boost(key)
        if key in self._queued:
            return
        self._queued.add(key)
        self._due.pop(key, None)
        if key not in self._processing:
            self._ready[self._lane(key)].append(key)
            self._ready_since[key] = self._clock()
            self._wakeup.set()

    def add_after(self, key: K, delay: float, *, urgent: bool = False) -> None:
        """Queue a key after `delay` seconds (an earlier pending time wins); `urgent` applies when it is due."""
        if delay <= 0:
            self.add(key, urgent=urgent)
            return
        if self._shutdown:
            return
        if urgent:
            self._boost(key)
        if key in self._queued:
            return
        due = self._clock() + delay
        if key in self._due and self._due[key] <= due:
            return
        self._due[key] = due
        heapq.heappush(self._delayed, (due, next(self._seq), key))
        self._wakeup.set()

    def _lane(self, key: K) -> int:
        return HIGH if key in self._urgent else self._priority(key)

    def _boost(self, key: K) -> None:
        """Hand the key out with the high priority next time; if it waits in the normal lane, move it up."""
        if self._priority(key) == HIGH or key in self._urgent:
            return
        self._urgent.add(key)
        if key in self._queued and key not in self._processing:
            self._ready[NORMAL].remove(key)  # O(backlog), once per urgent key
            self._ready[HIGH].append(key)

    def add_rate_limited(self, key: K, at_least: float | None = None) -> float:
        """Queue a key after its next backoff delay, or `at_least` seconds if that is longer; returns the delay."""
        failures = self._failures.get(key, 0)
        self._failures[key] = failures + 1
        delay = max(min(self.max_delay, self.base_delay * 2.0**failures), at_least or 0.0)
        self.add_after(key, delay)
        return delay

    def forget(self, key: K) -> None:
        """The key succeeded: its next failure starts the backoff from the beginning."""
        self._failures.pop(key, None)

    def failures(self, key: K) -> int:
        """How often the key failed since it was last forgotten."""
        return self._failures.get(key, 0)

    # ------------------------------------------------------------ taking

    def _promote_due(self) -> float | None:
        """Move delayed keys whose time has come to the ready deques; seconds until the next one."""
        now = self._clock()
        while self._delayed:
            due, _, key = self._delayed[0]
            if self._due.get(key) != due:  # superseded by an earlier time, or added meanwhile
                heapq.heappop(self._delayed)
                continue
            if due > now:
                return due - now
            heapq.heappop(self._delayed)
            del self._due[key]
            self.add(key)
            if key in self._ready_since:  # ready since it was due, though no worker looked until now
                self._ready_since[key] = min(self._ready_since[key], due)
        return None

    async def get(self) -> K:
        """The next key to process (highest priority first); marks it as processing."""
        while True:
            if self._shutdown:
                raise ShutDown
            wait = self._promote_due()
            for ready in self._ready:
                if ready:
                    key = ready.popleft()
                    self._queued.discard(key)
                    self._urgent.discard(key)
                    self._processing.add(key)
                    self._on_take(key, self._clock() - self._ready_since.pop(key, self._clock()))
                    return key
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout=wait)

    def done(self, key: K) -> None:
        """Processing of `key` ended; if it was added meanwhile, it is queued again."""
        self._processing.discard(key)
        if key in self._queued:
            self._ready[self._lane(key)].append(key)
            self._ready_since[key] = self._clock()
            self._wakeup.set()

    def shutdown(self) -> None:
        """Wake every waiting worker with ShutDown; nothing is queued any more."""
        self._shutdown = True
        self._wakeup.set()

    # ------------------------------------------------------------ looking

    def __len__(self) -> int:
        return len(self._ready[0]) + len(self._ready[1])

    def pending(self) -> int:
        """Keys waiting now or later."""
        return len(self) + len(self._due)

    def in_progress(self, key: K) -> bool:
        """Whether the key is waiting for a worker or held by one, and not backing off after a failure."""
        busy = key in self._queued or key in self._processing or key in self._due
        return busy and key not in self._failures

    def is_processing(self, key: K) -> bool:
        """Whether a worker holds the key right now."""
        return key in self._processing
