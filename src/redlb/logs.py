"""Process logging that never blocks the event loop.

A stderr nobody reads (a full pipe, a stalled terminal) would block every ``logging`` call,
and with it the worker's event loop.  Records go through a bounded queue to one writer thread
per process; when the queue is full, records are dropped and counted, never the service.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import queue
import sys
import time

LOG_QUEUE = 1000  # records waiting for stderr; beyond, new ones are dropped


class NonBlockingLogHandler(logging.handlers.QueueHandler):
    """Hands records to a thread that writes them: a stalled stderr stalls that thread only.

    Each process starts its own thread on its first record, so forked workers get one too.
    """

    def __init__(self, target: logging.Handler) -> None:
        super().__init__(queue.Queue(LOG_QUEUE))
        self.target = target
        self.pid = 0
        self.dropped = 0

    def enqueue(self, record: logging.LogRecord) -> None:
        if self.pid != os.getpid():
            self.pid = os.getpid()
            self.queue = queue.Queue(LOG_QUEUE)
            logging.handlers.QueueListener(self.queue, self.target).start()
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1

    def flush(self) -> None:
        """At exit: give the writer a moment to empty the queue, without ever hanging."""
        pending: queue.Queue[logging.LogRecord] = self.queue  # type: ignore[assignment]
        deadline = time.monotonic() + 1.0
        while self.pid == os.getpid() and not pending.empty() and time.monotonic() < deadline:
            time.sleep(0.01)


def setup_logging(verbose: bool) -> None:
    stderr = logging.StreamHandler(sys.stderr)
    stderr.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler = NonBlockingLogHandler(stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))  # the writer's formatter does the rest
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])
