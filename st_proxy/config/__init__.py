"""The configuration: the frozen model, its loaders, secret references and file watching.

The bottom of the package: nothing here imports another subpackage.
"""

from .load import from_environment, from_mapping, load_file
from .model import (
    Config,
    ConfigError,
    Environment,
    RoutingConfig,
    ShutdownConfig,
    Tenant,
    TokenConfig,
    UpstreamConfig,
)
from .tls import ForwardProxyConfig, TLSConfig
from .values import Address, parse_address

__all__ = [
    "Address",
    "Config",
    "ConfigError",
    "Environment",
    "ForwardProxyConfig",
    "RoutingConfig",
    "ShutdownConfig",
    "TLSConfig",
    "Tenant",
    "TokenConfig",
    "UpstreamConfig",
    "from_environment",
    "from_mapping",
    "load_file",
    "parse_address",
]
