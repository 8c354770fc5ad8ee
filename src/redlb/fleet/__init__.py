"""The fleet: every instance registers itself in Redis and publishes what it serves.

``instance``: this instance's identity, made once before the workers fork.
``publisher``: each worker's once-a-second heartbeat and counters (bounded Redis cost).
``view``: the whole fleet read back from Redis, for the admin API, the dashboard and
``redlb status``.
"""
