"""Default certificate lifetimes, in a module of their own: the CLI shows them in ``st-proxy certs --help`` without
loading the cryptography package, which ``st-proxy serve`` imports only when TLS or the forward proxy is configured."""

CA_DAYS = 3650
LEAF_DAYS = 365
