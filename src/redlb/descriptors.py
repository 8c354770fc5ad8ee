"""Out of descriptors is redlb's own shortage, never a backend's fault.

A worker at its descriptor limit (a crowd of clients or tunnels) cannot dial a backend or
probe it; counted against the backend, that would eject it or mark it down fleet-wide
through Redis.  The error does not always say EMFILE: for a host name glibc cannot read
/etc/hosts and says the name does not exist (EAI_NONAME), and uvloop's lookup has answered
EBUSY.  So an error that is not the backend's own answer (refused, reset, timed out) is
checked against the process itself.
"""

from __future__ import annotations

import errno
import os
import ssl

SHORTAGE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def is_own_shortage(exc: BaseException) -> bool:
    """Whether a failed dial (or name lookup) failed for want of this process's resources."""
    if not isinstance(exc, OSError):
        return False
    if exc.errno in SHORTAGE_ERRNOS:
        return True
    if isinstance(exc, ConnectionError | TimeoutError | ssl.SSLError):
        return False  # the backend answered (or did not in time)
    try:  # an error path only: one open() tells them apart
        os.close(os.open(os.devnull, os.O_RDONLY))
    except OSError as own:
        return own.errno in SHORTAGE_ERRNOS
    return False
