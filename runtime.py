"""What every script shares at run time.

Imports no script of this repo, so that any of them can import it.
"""
from __future__ import annotations

import signal
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool


# --------------------------------------------------------------------------- worker processes
class WorkerDied(RuntimeError):
    """A worker process ended without returning (killed by the system, often for lack of memory)."""


def worker_signals(_worker_id: int | None = None) -> None:
    """Signal handling of every worker process (a pool's initializer, a DataLoader's worker_init_fn).

    Ctrl-C belongs to the parent, which stops the work and ends the workers; SIGTERM ends a worker,
    which is how pools and DataLoader shut workers down. A forked worker otherwise inherits the
    parent's handlers: train.py's stop request once made idle pool workers shrug off the pool's
    SIGTERM, and the parent waited for them forever (make demo hung in about half the runs)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _run_chunk(fn, chunk: list) -> list:
    return [fn(item) for item in chunk]


def map_in_processes(fn, items: list, workers: int, chunksize: int = 1):
    """fn(item) for every item on `workers` processes, yielded in the order they finish; in this
    process when workers <= 1 (plain tracebacks, pdb works).

    concurrent.futures notices a worker that dies and raises WorkerDied at once, where
    multiprocessing.Pool would wait for its lost task forever. Stopping early (Ctrl-C, an error, the
    caller breaking off) cancels every chunk not yet started and waits only for the running ones."""
    if workers <= 1 or len(items) <= 1:
        yield from map(fn, items)
        return
    with ProcessPoolExecutor(min(workers, len(items)), initializer=worker_signals) as pool:
        futures = [pool.submit(_run_chunk, fn, items[i:i + chunksize]) for i in range(0, len(items), chunksize)]
        try:
            for future in as_completed(futures):
                yield from future.result()
        except BrokenProcessPool:
            raise WorkerDied("a worker process died (killed by the system, often for lack of memory); "
                             "rerun with --workers 1 to see its error") from None
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
