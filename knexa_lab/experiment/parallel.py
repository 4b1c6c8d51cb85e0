"""``jobs > 1``: (method, seed) runs in worker processes, logs and progress relayed to the parent.

Each run is self-seeded, so where it runs changes no number (a test compares a parallel resume
with an in-process run field for field). Workers are spawned (not forked: torch and its thread
pools do not survive a fork), one per run, so a run's models leave memory with its process. Each
worker owns its run's checkpoint and progress files; metrics appends are locked
(:func:`.metrics.append_rows`). Log records and round events travel over one queue and are
handled by the parent's handlers, so the console and ``experiment.log`` look as in-process.
"""

from __future__ import annotations

import logging
from typing import Any

from .engine import Events, RunJob, run_one

__all__ = ["run_parallel"]

logger = logging.getLogger(__name__)


def _worker(job: RunJob, queue: Any) -> None:
    """A worker process: logs and round events go to the parent through ``queue``."""
    import logging.handlers
    import sys

    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(logging.handlers.QueueHandler(queue))
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        run_one(job, lambda kind, key, r: queue.put(("event", kind, key, r)))
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception:
        logger.exception("%s seed=%d failed; the other runs go on (re-run to retry it)", job.name, job.seed)
        sys.exit(1)


def _drain(queue: Any, events: Events, timeout: float) -> None:
    import queue as queue_mod

    block = timeout > 0
    while True:
        try:
            item = queue.get(block, timeout) if block else queue.get_nowait()
        except queue_mod.Empty:
            return
        block = False
        if isinstance(item, logging.LogRecord):
            logging.getLogger(item.name).handle(item)
        else:
            _, kind, key, r = item
            events(kind, key, r)


def run_parallel(jobs: list[RunJob], n: int, events: Events) -> list[str]:
    """Run ``jobs`` in at most ``n`` worker processes; returns the keys of failed runs.

    Each worker owns its run's files; metrics appends are locked. On KeyboardInterrupt every
    worker is terminated: each loses only its round in progress.
    """
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    waiting, running, failed = list(jobs), {}, []
    try:
        while waiting or running:
            while waiting and len(running) < n:
                job = waiting.pop(0)
                proc = ctx.Process(target=_worker, args=(job, queue), name=f"knexa-{job.key}")
                proc.start()
                running[job.key] = proc
            _drain(queue, events, 0.5)
            for key, proc in list(running.items()):
                if proc.exitcode is not None:
                    proc.join()
                    del running[key]
                    if proc.exitcode != 0:
                        failed.append(key)
        _drain(queue, events, 0)
    finally:
        for proc in running.values():
            proc.terminate()
        for proc in running.values():
            proc.join()
    return failed
