"""st-credential-proxy: a credential-injecting reverse proxy for the ServiceTitan API."""

__version__ = "0.1.0"
