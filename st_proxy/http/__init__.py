"""The data port's request path: routing, headers, forwarding with replay, and the problem answers."""
