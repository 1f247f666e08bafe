"""Supervision of long-running child processes, like docker's `restart: unless-stopped`: a child that exits
is started again after 1, 2, 4 ... s (at most RESTART_BACKOFF_CAP); more than RESTART_LIMIT restarts of
one child within RESTART_WINDOW seconds is a crash loop, and CrashLoop is raised for the owner to stop
everything. The owner (flows.ops.stack.Services) says how to start each child and when one has recovered.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime

from flows.ops import processes
from flows.ops.errors import ServiceError
from flows.ops.processes import Child

RESTART_LIMIT = 5
RESTART_WINDOW = 120.0
RESTART_BACKOFF_CAP = 30.0


class CrashLoop(ServiceError):
    """A service kept exiting: more than RESTART_LIMIT restarts within RESTART_WINDOW seconds."""


class Supervisor:
    """The restart bookkeeping of a set of children, by key: how to start each one again, when each was
    restarted (monotonic), the restarts due (key: when) and the children down since (key: monotonic,
    UTC) until `recovered` says they answer again. `log` is called with each line worth showing."""

    def __init__(self, log: Callable[[str], None]):
        self._log = log
        self._spawners: dict[str, Callable[[], Child]] = {}
        self._restarts: dict[str, list[float]] = {}
        self._due: dict[str, float] = {}
        self._down: dict[str, tuple[float, datetime]] = {}

    def reset(self) -> None:
        """Forget every restart and outage (a fresh start of the children)."""
        self._restarts.clear()
        self._due.clear()
        self._down.clear()

    def start(self, key: str, spawner: Callable[[], Child]) -> Child:
        """Start the child `key` with `spawner`, which also starts it again after it exits."""
        self._spawners[key] = spawner
        return spawner()

    @property
    def restarting(self) -> list[str]:
        """The keys of the children that exited and do not answer again yet."""
        return sorted(self._down)

    def supervise(self, children: dict[str, Child], recovered: Callable[[str, datetime], bool]) -> list[str]:
        """One round over `children` (updated in place: a restarted child replaces the exited one) ->
        the keys restarted in this round. An exited child is restarted after its backoff (logged: "MLflow
        server exited with code -9; restarting in 1 s (1/5 in 2 min)"), its recovery logged once
        `recovered(key, down since)` says so. Raises CrashLoop (naming the child, with its log's last
        lines) on the RESTART_LIMIT + 1st exit within RESTART_WINDOW seconds."""
        now = time.monotonic()
        for key, child in children.items():
            if key in self._due or key not in self._spawners or child.alive:
                continue
            self._schedule_restart(key, child, now)
        restarted = [key for key, due in self._due.items() if now >= due]
        for key in restarted:
            del self._due[key]
            self._restarts[key].append(now)
            children[key] = self._spawners[key]()
        for key, (since, since_utc) in list(self._down.items()):
            if key not in self._due and recovered(key, since_utc):
                del self._down[key]
                self._log(f"{children[key].name} is back ({now - since:.1f} s after it exited)")
        return restarted

    def _schedule_restart(self, key: str, child: Child, now: float) -> None:
        processes.reap(child)
        recent = [t for t in self._restarts.get(key, []) if now - t < RESTART_WINDOW]
        self._restarts[key] = recent
        window = f"{RESTART_WINDOW / 60:g} min"
        if len(recent) >= RESTART_LIMIT:
            raise CrashLoop(
                f"{child.name} exited with code {child.exit_code} after {len(recent)} restarts in "
                f"{window}: a crash loop, giving up; {child.tail(15)}"
            )
        delay = min(2.0 ** len(recent), RESTART_BACKOFF_CAP)
        self._due[key] = now + delay
        self._down.setdefault(key, (now, datetime.now(UTC)))
        self._log(
            f"{child.name} exited with code {child.exit_code}; restarting in {delay:g} s "
            f"({len(recent) + 1}/{RESTART_LIMIT} in {window})"
        )
