"""Strategies: one algorithm a module behind the small interface of base.py."""

from __future__ import annotations

from redlb.balancer.base import Strategy
from redlb.balancer.leased import LeasedRoundRobin
from redlb.balancer.strict import StrictRoundRobin

STRATEGIES: dict[str, type[Strategy]] = {
    "lease": LeasedRoundRobin,
    "strict": StrictRoundRobin,
}

__all__ = ["STRATEGIES", "LeasedRoundRobin", "Strategy", "StrictRoundRobin"]
