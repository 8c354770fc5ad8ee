"""The copy of a request body kept for a retry: whole, or gone.

A retry must send the backend exactly the request the client sent (RFC 9110 §9.2.2): every
body byte, once.  A copy that lost bytes is worse than none, so past the limit the copy is
dropped entirely and ``whole`` turns False for good; nothing partial is ever handed out.
"""

from __future__ import annotations

# Up to this many framed body bytes are kept for a replay (the keep-alive race, a 503).
REPLAY_LIMIT = 64 * 1024


class ReplayBuffer:
    __slots__ = ("chunks", "limit", "size")

    def __init__(self, limit: int = REPLAY_LIMIT) -> None:
        self.limit = limit
        self.size = 0
        self.chunks: list[bytes] | None = []  # None: over the limit, gone for good

    @property
    def whole(self) -> bool:
        return self.chunks is not None

    def add(self, framed: bytes) -> None:
        chunks = self.chunks
        if chunks is None:
            return
        self.size += len(framed)
        if self.size > self.limit:
            self.chunks = None
        else:
            chunks.append(framed)

    def copy(self) -> list[bytes]:
        """Every byte kept so far, to send again; only asked while ``whole``."""
        chunks = self.chunks
        assert chunks is not None, "a replay that is gone cannot be resent"
        return chunks.copy()
