"""Health: active probes and passive ejection.  They set status on the pool; they never pick."""
