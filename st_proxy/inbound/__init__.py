"""Callers of the data port: the client registry, caller authentication and authorization, the wrong-secret
throttle, and the local token issuer and endpoint (docs/security.md)."""
