"""What a client connection's deadlines mean, one per purpose, and which one wins.

A client connection has three deadlines (0.0 = not armed), each with one owner:
1. header: the request head must be complete by then (408).  Armed by the first byte of a
   head — including a pipelined head that follows a complete request in the same read —
   and by accepting the connection; disarmed when the head is complete.
2. idle: a keep-alive connection with nothing in flight must start a request by then
   (close).  Armed when the last response is handed over, disarmed by the next request.
3. send: a client whose socket stayed full this long is not reading (abort: a close would
   wait for a flush that never comes, and the backend connection must be freed).  Armed by
   pause_writing, disarmed by resume_writing; independent of what is being parsed.
The backend's side has its own deadline (UpstreamConnection.deadline, owned by the
exchange): it runs only while the backend owes progress, never while the client is slow.
One sweeper checks them all; nothing here arms a timer.
"""

from __future__ import annotations

KEEP = 0
REFUSE = 1  # answer 408, then close
CLOSE = 2  # close after what is already queued
ABORT = 3  # drop now: nothing queued can be delivered


def verdict(now: float, header: float, idle: float, send: float) -> int:
    """What to do with a connection at ``now``; a client that does not read comes first,
    since neither a 408 nor a clean close can reach it."""
    if send and now > send:
        return ABORT
    if header and now > header:
        return REFUSE
    if idle and now > idle:
        return CLOSE
    return KEEP
