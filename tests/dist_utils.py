"""Spawn N gloo processes on 127.0.0.1 and collect what each returns (tests only).

``run_distributed(fn, world_size=2, args=(...))`` starts ``world_size`` fresh processes (spawn,
so nothing of the parent's OpenMP/thread state is inherited), initialises the default process
group with gloo over TCP on a free local port, calls ``fn(rank, world_size, *args)`` in each and
returns the list of results ordered by rank. An exception in any rank is re-raised in the parent
as ``RuntimeError`` carrying every failing rank's traceback; a rank that hangs is ended after
``timeout`` seconds (only the processes started here are ended).

``fn`` must be importable by name from a fresh interpreter: a module-level function of a test
module (``tests/`` is on ``sys.path`` through conftest, and spawn passes ``sys.path`` on).
Results travel back through a multiprocessing queue: keep them to tensors, numbers, strings and
dicts/lists/tuples of those. Tensors are sent by value as numpy arrays (torch's own queue
reduction would share memory with a process that is about to exit) and rebuilt in the parent.
"""

from __future__ import annotations

import os
import queue
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pack(obj: Any) -> Any:
    import torch

    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        return _Tensor(
            str(t.dtype).removeprefix("torch."),
            t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy(),
        )
    if isinstance(obj, dict):
        return {k: _pack(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_pack(v) for v in obj)
    return obj


def _unpack(obj: Any) -> Any:
    import torch

    if isinstance(obj, _Tensor):
        return torch.from_numpy(obj.array).to(getattr(torch, obj.dtype))
    if isinstance(obj, dict):
        return {k: _unpack(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_unpack(v) for v in obj)
    return obj


class _Tensor:
    """A tensor on its way between processes: dtype name and a numpy copy of the values."""

    def __init__(self, dtype: str, array: Any) -> None:
        self.dtype, self.array = dtype, array


def _entry(
    rank: int,
    world_size: int,
    port: int,
    fn: Callable[..., Any],
    args: tuple,
    results: Any,
    threads: int,
    backend: str,
) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    # Environment variables as torchrun sets them, so that code reading them (accelerate,
    # transformers, entrolora.distributed) sees a launched job.
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    try:
        dist.init_process_group(
            backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
        )
        try:
            out = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        results.put((rank, True, _pack(out)))
    except BaseException:  # report everything, KeyboardInterrupt included, then exit
        results.put((rank, False, traceback.format_exc()))


def run_distributed(
    fn: Callable[..., Any],
    world_size: int = 2,
    args: tuple = (),
    timeout: float = 120.0,
    threads: int = 1,
    backend: str = "gloo",
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` processes; results by rank.

    Raises ``RuntimeError`` with the tracebacks of the failing ranks, or naming the ranks that
    did not finish within ``timeout`` seconds.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be ≥ 1, got {world_size}")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_entry,
            args=(rank, world_size, port, fn, args, results, threads, backend),
            daemon=True,
        )
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    got: dict[int, tuple[bool, Any]] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(got) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                rank, ok, out = results.get(timeout=min(left, 1.0))
            except queue.Empty:
                # A rank that died without reporting (segfault, OOM kill) leaves the others
                # waiting in a collective: stop early rather than at the deadline.
                dead = [
                    r for r, p in enumerate(procs) if r not in got and p.exitcode not in (None, 0)
                ]
                if dead:
                    break
                continue
            got[rank] = (ok, out)
            if not ok:
                break  # the peers are likely stuck in a collective with the failed rank
    finally:
        for p in procs:
            p.join(timeout=5.0 if len(got) == world_size else 0.5)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    failed = {r: out for r, (ok, out) in got.items() if not ok}
    if failed:
        msg = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(failed.items()))
        raise RuntimeError(f"{len(failed)} of {world_size} processes failed:\n{msg}")
    missing = [r for r in range(world_size) if r not in got]
    if missing:
        codes = {r: procs[r].exitcode for r in missing}
        raise RuntimeError(
            f"processes {missing} died or did not report within {timeout:g} s "
            f"(exit codes {codes}; negative: killed by that signal); "
            "a rank crashed or hung in a collective"
        )
    return [_unpack(got[r][1]) for r in range(world_size)]
