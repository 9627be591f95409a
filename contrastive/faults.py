"""Test-only fault injection: code that can be interrupted badly calls point(name); CONTRASTIVE_FAULT makes one call fail.

CONTRASTIVE_FAULT="NAME[@N]:ACTION" acts at the N-th call (default 1) of point(NAME) in this process:
kill (SIGKILL this process), sigterm (send SIGTERM to it and go on), enospc (raise OSError ENOSPC).
Unset (always, outside tests), point() is one dictionary lookup.
"""
from __future__ import annotations

import errno
import os
import signal

ENV = "CONTRASTIVE_FAULT"
ACTIONS = ("kill", "sigterm", "enospc")
_calls: dict[str, int] = {}


def parse(spec: str) -> tuple[str, int, str]:
    """"NAME[@N]:ACTION" -> (NAME, N, ACTION)."""
    where, _, action = spec.rpartition(":")
    name, _, nth = where.partition("@")
    if not name or action not in ACTIONS or (nth and not nth.isdigit()):
        raise ValueError(f"{ENV}={spec!r}: expected NAME[@N]:ACTION with ACTION one of {', '.join(ACTIONS)}")
    return name, int(nth or 1), action


def point(name: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    target, nth, action = parse(spec)
    if target != name:
        return
    _calls[name] = _calls.get(name, 0) + 1
    if _calls[name] != nth:
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "sigterm":
        os.kill(os.getpid(), signal.SIGTERM)
    else:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"{ENV} at {name}")
