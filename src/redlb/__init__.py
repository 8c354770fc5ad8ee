"""redlb: an HTTP load balancer whose backend pool and shared state live in Redis."""

__version__ = "0.1.0"

from redlb import build as _build  # before any compiled module is imported

_build.choose()
