"""Child processes: found beside this interpreter, and tied to this process's life."""

from __future__ import annotations

import ctypes
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from flows.ops.errors import ServiceError


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
