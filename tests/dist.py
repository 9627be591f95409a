"""Run a function on several gloo ranks in fresh processes and collect what each rank returns.

Usage in a test (the function must live at module level so spawned processes can import it):

    def _body(rank, world_size, x):      # runs inside an initialised gloo process group
        return {"sum": x * rank}

    results = run_ranks(_body, world_size=2, args=(3,))   # [result of rank 0, result of rank 1]
"""
from __future__ import annotations

import datetime
import os
import socket
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch


RENDEZVOUS_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def fresh_process_env(**extra: str) -> dict:
    """os.environ without the rendezvous variables an in-process test's process group left behind (its store
    still listens on MASTER_PORT), so a child process starts its own group; plus `extra`."""
    return {**{k: v for k, v in os.environ.items() if k not in RENDEZVOUS_VARS}, **extra}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, fn: Callable, world_size: int, port: int, out_dir: str, args: tuple, env: dict,
            timeout_s: float, num_threads: int) -> None:
    import torch.distributed as dist

    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank), **env})
    torch.set_num_threads(num_threads)
    # A timeout turns a deadlocked collective into an error instead of a hung test.
    dist.init_process_group("gloo", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_ranks(fn: Callable, *, world_size: int, args: tuple = (), env: dict | None = None,
              timeout_s: float = 120.0, num_threads: int = 1) -> list[Any]:
    """Spawn `world_size` processes in a gloo group, call `fn(rank, world_size, *args)` in each and return
    the per-rank results (anything torch.save can write), in rank order. An exception in any rank is
    raised here (torch.multiprocessing.ProcessRaisedException carries the rank's traceback)."""
    import multiprocessing

    import torch.multiprocessing as mp

    # A fork server imports torch once and forks every rank from that clean process: starting 4 ranks
    # costs one torch import instead of four (forking the test process itself is unsafe once it ran
    # OpenMP threads).
    multiprocessing.get_context("forkserver").set_forkserver_preload(["torch", "torch.distributed"])
    with tempfile.TemporaryDirectory(prefix="dist-test-") as out_dir:
        mp.start_processes(_worker, args=(fn, world_size, free_port(), out_dir, args, env or {}, timeout_s,
                                          num_threads), nprocs=world_size, join=True, start_method="forkserver")
        return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
