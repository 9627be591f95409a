"""Test-only fault injection: named points in the code where a test can make the process die or fail on purpose.

Not for users. A test sets the environment variable before starting a run (subprocesses inherit it):

    CONTRASTIVE_FAULT="checkpoint.after_write_before_publish=kill"        # SIGKILL this process there
    CONTRASTIVE_FAULT="checkpoint.write=enospc@2"                         # OSError(ENOSPC) on the 2nd pass only
    CONTRASTIVE_FAULT="checkpoint.write=enospc@2:0"                       # ... and only on rank 0 (env RANK)
    CONTRASTIVE_FAULT="a=kill,b=raise"                                    # several points

Grammar: comma-separated `point=action[@nth][:rank]`. Actions: `kill` (SIGKILL itself: no cleanup, no
finally, as a node dying), `term` (SIGTERM itself), `enospc` (raise OSError(ENOSPC), as a full disk), `raise`
(raise RuntimeError). `nth` (1-based, default 1) counts the passes through that point in this process; `rank`
compares with the RANK environment variable (0 if unset). Points in the code (grep `fault_point(`):

- checkpoint.write: every rank, after DeepSpeed wrote its files into checkpoints/.incoming/TAG, before our own
  per-rank file (a save failing midway through its writes).
- checkpoint.after_write_before_publish: rank 0, every file of the checkpoint staged and synced, before it is
  renamed into place.
- checkpoint.replace_aside: rank 0, re-saving a tag: the published one is renamed aside, the new one not yet in.
- checkpoint.before_latest: rank 0, the checkpoint published, `latest` not yet pointing at it.

The variable is read once, at import; unset, `fault_point` is one dict lookup on an empty dict.
"""
from __future__ import annotations

import errno
import os
import signal

ENV = "CONTRASTIVE_FAULT"
ACTIONS = ("kill", "term", "enospc", "raise")


def _parse(spec: str) -> dict[str, tuple[str, int, int | None]]:
    faults = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        point, sep, action = item.partition("=")
        rank = None
        if ":" in action:
            action, rank_text = action.split(":", 1)
            rank = int(rank_text)
        nth = 1
        if "@" in action:
            action, nth_text = action.split("@", 1)
            nth = int(nth_text)
        # A typo here would make a fault test pass without injecting anything: refuse it loudly.
        if not sep or action not in ACTIONS or nth < 1:
            raise ValueError(f"{ENV}={spec!r}: {item!r} is not point=ACTION[@nth][:rank] with ACTION in {ACTIONS}")
        faults[point.strip()] = (action, nth, rank)
    return faults


_FAULTS = _parse(os.environ.get(ENV, ""))
_passes: dict[str, int] = {}


def fault_point(name: str) -> None:
    """Fire the fault configured for point `name`, if any (test-only; nothing happens when CONTRASTIVE_FAULT is unset)."""
    fault = _FAULTS.get(name)
    if fault is None:
        return
    action, nth, rank = fault
    if rank is not None and int(os.environ.get("RANK", "0")) != rank:
        return
    _passes[name] = _passes.get(name, 0) + 1
    if _passes[name] != nth:
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "term":
        os.kill(os.getpid(), signal.SIGTERM)
    elif action == "enospc":
        raise OSError(errno.ENOSPC, f"No space left on device (injected by {ENV} at {name})")
    else:
        raise RuntimeError(f"fault injected by {ENV} at {name}")


def configure(spec: str) -> None:
    """Replace the faults in this process (for in-process tests; subprocesses read the environment variable)."""
    _FAULTS.clear()
    _FAULTS.update(_parse(spec))
    _passes.clear()
