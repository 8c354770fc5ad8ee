"""Strategies: one algorithm a module behind the small interface of base.py.

``round_robin`` is LeasedRoundRobin or StrictRoundRobin (``--rotation``); proxy/poolstate.py
builds each strategy with what it needs (the shared counter, the pool's LoadView).
"""

from __future__ import annotations

from redlb.balancer.base import Strategy
from redlb.balancer.ewma import PeakEwma
from redlb.balancer.first import FirstAvailable
from redlb.balancer.leased import LeasedRoundRobin
from redlb.balancer.least import LeastOutstanding
from redlb.balancer.leastconn import LeastConnections
from redlb.balancer.random_choice import RandomChoice
from redlb.balancer.rendezvous import RendezvousHash
from redlb.balancer.strict import StrictRoundRobin

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls
    for cls in (
        LeasedRoundRobin,
        StrictRoundRobin,
        LeastOutstanding,
        LeastConnections,
        PeakEwma,
        RendezvousHash,
        RandomChoice,
        FirstAvailable,
    )
}

__all__ = [
    "STRATEGIES",
    "FirstAvailable",
    "LeasedRoundRobin",
    "LeastConnections",
    "LeastOutstanding",
    "PeakEwma",
    "RandomChoice",
    "RendezvousHash",
    "Strategy",
    "StrictRoundRobin",
]
