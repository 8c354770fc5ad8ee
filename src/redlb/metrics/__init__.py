"""Metrics: plain counters on the hot path, one consistent view per instance at scrape time.

``recorder``: what the data path bumps (dicts and lists, no locks, no prometheus objects).
``snapshot``: a worker's counters and gauges as JSON, written to the instance's directory,
read back and summed over every worker.  ``exposition``: the summed view as Prometheus text.
"""
