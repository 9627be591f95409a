"""Stopping on request: SIGTERM/SIGUSR1 -> checkpoint at the next step boundary -> exit EXIT_PREEMPTED.

Kept free of heavy imports so the CLI can install the handler before torch/open_clip/DeepSpeed load (a
scheduler's signal during the first seconds of start-up must not kill the run) and so that the Slurm submit
helper can read the exit code without importing torch.
"""
from __future__ import annotations

import signal

# sysexits.h EX_TEMPFAIL: "temporary failure, the user is invited to retry" - the run saved a checkpoint
# because it was asked to stop (SIGTERM/SIGUSR1) and can be resumed with train.resume=latest.
EXIT_PREEMPTED = 75


class StopRequest:
    """SIGTERM/SIGUSR1 set a flag; the training loop checkpoints and exits at the next step boundary."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.requested = False
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
