"""`contrastive` commands in processes forked from one server that imported the heavy modules once.

A training process spends ~4 s of its start-up importing torch, DeepSpeed and open_clip; the fault matrix starts
dozens of them (each kill needs a process of its own). The server (this module run with -m, started by
ForkServer) imports them once and forks a child per command; the child runs contrastive.cli.main as the console
entry point would, with its output in a log file. The server never runs torch itself (no OpenMP threads, no
process group), so forking it is safe; every child starts its own process group.

Protocol, one JSON object a line: {"argv", "cwd", "log", "fault"} -> {"pid"}; {"wait": pid} -> {"rc"} (a signal's
death as minus its number, as subprocess reports it); {"poll": pid} -> {"rc"}, None while it runs.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO
from tests.dist import fresh_process_env


def _child(request: dict, reply_fd: int) -> None:
    os.close(reply_fd)
    log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    os.chdir(request["cwd"])
    code = 1
    try:
        from contrastive import faults
        from contrastive.cli import main

        faults.configure(request.get("fault") or "")  # the module read the (empty) variable when the server imported it
        code = main(request["argv"])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def serve() -> None:
    reply = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # whatever the imports print must not reach the reply pipe
    import contrastive.cli  # noqa: F401
    import contrastive.train  # noqa: F401
    import contrastive.eval.zeroshot  # noqa: F401
    import open_clip  # noqa: F401
    import torch.utils.tensorboard  # noqa: F401
    from contrastive.engine import import_deepspeed
    from contrastive.sharding import expand_sources  # noqa: F401

    import_deepspeed()
    print(json.dumps({"ready": os.getpid()}), file=reply, flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if "wait" in request or "poll" in request:
            pid, status = os.waitpid(request.get("wait", request.get("poll")), 0 if "wait" in request else os.WNOHANG)
            answer = {"rc": os.waitstatus_to_exitcode(status) if pid else None}
        else:
            pid = os.fork()
            if pid == 0:
                _child(request, reply.fileno())
            answer = {"pid": pid}
        print(json.dumps(answer), file=reply, flush=True)


class ForkServer:
    """Start with ForkServer(); run(...) -> pid of a `contrastive` command; wait(pid) -> its exit code."""

    def __init__(self, **env: str):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.forked_runs"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            cwd=REPO, env=fresh_process_env(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO),
                                            TOKENIZERS_PARALLELISM="false", **env))
        assert "ready" in json.loads(self.proc.stdout.readline() or '{"failed": 1}'), "the fork server did not start"

    def _ask(self, request: dict) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def run(self, argv: list[str], *, log: Path, fault: str = "", cwd: Path | None = None) -> int:
        return self._ask({"argv": argv, "cwd": str(cwd or log.parent), "log": str(log), "fault": fault})["pid"]

    def wait(self, pid: int) -> int:
        return self._ask({"wait": pid})["rc"]

    def poll(self, pid: int) -> int | None:
        """Its exit code if it ended (it is then reaped: do not wait for it), else None."""
        return self._ask({"poll": pid})["rc"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


if __name__ == "__main__":
    serve()
