"""Child processes: found beside this interpreter, tied to this process's life, logged to a file and
stopped with everything they started."""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import psutil

from flows.ops.errors import ServiceError

# Rounds of (signal, seconds to wait for the exit); whatever is left after the last round is killed.
StopSchedule = Sequence[tuple[int, float]]


def executable(name: str) -> str:
    """The console script installed beside this interpreter (the project venv), else from PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if not found:
        raise ServiceError(f"`{name}` is not installed (pip install -e . in the project venv)")
    return found


def die_with_parent(sig: int) -> Callable[[], None] | None:
    """preexec_fn making the child receive `sig` if this process dies (Linux prctl PR_SET_PDEATHSIG).

    So a launcher killed with SIGKILL does not leave servers running. Linux ties this to the *thread*
    that started the child: start services from a thread that outlives them (normally the main one).
    The preexec function only calls prctl (no locks, no imports): safe with other threads running.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(1, sig, 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), sig)

    return preexec


@dataclass
class Child:
    """A child process whose output goes to `log` (appended to; this start's part begins at `log_offset`)."""

    name: str
    proc: subprocess.Popen
    log: Path
    log_offset: int
    secrets: tuple[str, ...] = ()  # hidden as *** in tail()

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    @property
    def exit_code(self) -> int | None:
        return self.proc.poll()

    def tail(self, lines: int = 25) -> str:
        """The last lines this child wrote to its log (this start only), secrets hidden."""
        try:
            with open(self.log, "rb") as f:
                f.seek(self.log_offset)
                text = f.read().decode(errors="replace")
        except OSError:
            return f"(no log at {self.log})"
        for secret in self.secrets:
            text = text.replace(secret, "***")
        kept = [line for line in text.splitlines() if line.strip()][-lines:]
        if not kept:
            return f"({self.log} is empty)"
        return f"last lines of {self.log}:\n" + "\n".join("    " + line for line in kept)


def spawn(
    name: str,
    argv: list[str],
    *,
    env: dict[str, str],
    cwd: Path,
    log: Path | None,
    death_signal: int | None = None,
    secrets: tuple[str, ...] = (),
) -> Child:
    """Start `argv` (its program found by `executable`) with stdout and stderr appended to `log` (None:
    this process's own stdout and stderr), in a session of its own (a Ctrl-C in our terminal reaches
    only us: we stop children in our order), and sent `death_signal` by the kernel if this process dies."""
    argv = [executable(argv[0]), *argv[1:]]
    options = dict(
        stdin=subprocess.DEVNULL,
        env=env,
        cwd=cwd,
        start_new_session=True,
        preexec_fn=die_with_parent(death_signal) if death_signal else None,
    )
    if log is None:
        return Child(name, subprocess.Popen(argv, **options), Path(os.devnull), 0, secrets)  # noqa: PLW1509
    with open(log, "ab") as f:
        offset = f.tell()
        stamp = datetime.now().isoformat(timespec="seconds")
        f.write(f"\n===== {stamp} {' '.join(argv)}\n".encode())
        f.flush()
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, **options)  # noqa: PLW1509 - prctl only
    return Child(name, proc, log, offset, secrets)


def stop(children: Iterable[Child | None], schedule: StopSchedule, grace: float = 2.0) -> None:
    """Stop `children` together and everything they started: each round of `schedule` signals the
    children still running and waits for them; then the rest is killed. Their descendants (uvicorn
    workers, flow-run processes, in sessions of their own or not) get `grace` seconds to exit with
    their parent, then are killed too."""
    children = [child for child in children if child is not None]
    tree: set[psutil.Process] = set()
    for sig, wait in schedule:
        running = [child for child in children if child.alive]
        tree |= _descendants(running)
        for child in running:
            _signal(child, sig)
        _wait_children(running, wait)
    tree |= _descendants(child for child in children if child.alive)
    for child in children:
        if child.alive:
            child.proc.kill()
        child.proc.wait()
    _kill_when_late(tree, grace)


def reap(child: Child) -> None:
    """After `child` exited on its own: kill what is left of its process group (spawn gives each child
    a session of its own), e.g. uvicorn workers of a killed server still holding its port."""
    if child.alive:
        return
    try:
        os.killpg(child.proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _descendants(children: Iterable[Child]) -> set[psutil.Process]:
    found: set[psutil.Process] = set()
    for child in children:
        try:
            found.update(psutil.Process(child.proc.pid).children(recursive=True))
        except psutil.NoSuchProcess:
            pass
    return found


def _signal(child: Child, sig: int) -> None:
    try:
        child.proc.send_signal(sig)
    except ProcessLookupError:
        pass


def _wait_children(children: list[Child], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while any(child.alive for child in children) and time.monotonic() < deadline:
        time.sleep(0.05)


def _running(process: psutil.Process) -> bool:
    """Alive and not a zombie (a zombie's parent has yet to reap it: it has exited)."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _kill_when_late(processes: set[psutil.Process], grace: float) -> None:
    deadline = time.monotonic() + grace
    while any(_running(p) for p in processes) and time.monotonic() < deadline:
        time.sleep(0.05)
    for process in processes:
        try:
            process.kill()  # psutil checks the pid still names the same process
        except psutil.NoSuchProcess:
            pass
