"""Running a function on N gloo ranks from a test: processes of their own, always ended (on failure and on timeout
too), results sent back as bytes."""

from __future__ import annotations

import io
import os
import queue
import socket
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(worker, rank: int, world: int, port: int, results, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)  # N ranks share the CI machine's few cores
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        buffer = io.BytesIO()
        torch.save(worker(rank, world, *args), buffer)
        results.put((rank, None, buffer.getvalue()))
    except BaseException:  # reported to the test, which raises it
        results.put((rank, traceback.format_exc(), None))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(worker, world: int, *args, timeout: float = 150.0) -> list:
    """``worker(rank, world, *args)`` on ``world`` gloo ranks; returns each rank's result, in rank order. Raises
    the first rank's error (with its traceback) or ``TimeoutError``; every process is ended before it returns."""
    context = mp.get_context("spawn")
    results = context.Queue()
    port = free_port()
    processes = [context.Process(target=_entry, args=(worker, rank, world, port, results, args), daemon=True)
                 for rank in range(world)]  # fmt: skip
    for process in processes:
        process.start()
    received: dict[int, object] = {}
    try:
        deadline = time.monotonic() + timeout
        while len(received) < world:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{worker.__name__} on {world} ranks: no result after {timeout:.0f} s")
            try:
                rank, error, payload = results.get(timeout=1.0)
            except queue.Empty:
                dead = [p.exitcode for p in processes if p.exitcode not in (None, 0)]
                if dead and results.empty():
                    raise RuntimeError(f"{worker.__name__}: a rank died (exit codes {dead})") from None
                continue
            if error is not None:
                raise RuntimeError(f"{worker.__name__} failed on rank {rank}:\n{error}")
            received[rank] = torch.load(io.BytesIO(payload), weights_only=False)
    finally:
        for process in processes:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join()
        results.close()
    return [received[rank] for rank in range(world)]
