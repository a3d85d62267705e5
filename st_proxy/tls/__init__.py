"""TLS: the local CA and its certificates, the data port's reloadable TLS context, and the forward-proxy mode."""
