"""TLS termination: certificates chosen by SNI, reloaded live, and the https redirect."""
