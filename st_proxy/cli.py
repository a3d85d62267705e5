"""The command line: argument parsing, exit codes, and what each command runs. Nothing else.

Exit codes: 0 clean stop, 2 bad config or usage, 1 anything else. Expected errors print one line per problem to
stderr, without a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Mapping, Sequence

from . import __version__
from .config import (
    Address,
    Config,
    ConfigError,
    from_environment,
    from_mapping,
    load_file,
    parse_address,
)
from .config import tls as tls_sections
from .inbound.summary import security_summary
from .ops import log as logsetup
from .server.serve import EXIT_FAILURE, EXIT_OK, run_until_signalled, serve
from .tls import commands as certs_commands

EXIT_CONFIG = 2
log = logging.getLogger("st_proxy.cli")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="st-proxy", description="Credential-injecting proxy for the ServiceTitan API")
    parser.add_argument("--version", action="version", version=f"st-proxy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the proxy")
    serve.add_argument("--config", help="YAML config file (default: $ST_PROXY_CONFIG, else the ST_* environment)")
    serve.add_argument("--log-format", choices=("json", "text"), default="json")
    serve.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))

    check = sub.add_parser("check-config", help="validate the config and print a redacted summary")
    check.add_argument("--config", help="YAML config file (default: $ST_PROXY_CONFIG, else the ST_* environment)")

    demo = sub.add_parser("demo", help="run the bundled simulator with the proxy in front of it (offline)")
    demo.add_argument("--listen", default="127.0.0.1:8080", help="data port (default 127.0.0.1:8080)")
    demo.add_argument("--admin-listen", default="127.0.0.1:9090", help="admin port (default 127.0.0.1:9090)")
    demo.add_argument("--token-ttl", type=float, default=900, help="simulator token lifetime in seconds")

    sim = sub.add_parser("simulate", help="run the ServiceTitan simulator alone")
    sim.add_argument("--listen", default="127.0.0.1:8900", help="HOST:PORT (default 127.0.0.1:8900)")
    sim.add_argument("--tenant", action="append", default=[], metavar="ID:CLIENT_ID:SECRET")
    sim.add_argument("--app-key", default=None)
    sim.add_argument("--token-ttl", type=float, default=900)
    certs_commands.add_parser(sub)
    return parser


class UsageError(Exception):
    pass


def load_config(path: str | None, environ: Mapping[str, str]) -> Config:
    path = path or environ.get("ST_PROXY_CONFIG")
    return load_file(path, environ) if path else from_environment(environ)


def _address(text: str) -> Address:
    try:
        return parse_address(text)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    args = _parser().parse_args(argv)  # argparse exits 2 on usage errors
    environ = os.environ if environ is None else environ
    try:
        if args.command == "certs":
            return certs_commands.run(args)
        if args.command == "check-config":
            return check_config(args.config, environ)
        if args.command == "serve":
            config = load_config(args.config, environ)
            logsetup.setup(args.log_format, args.log_level, libraries=True)
            for warning in config.warnings:
                log.warning("config: %s", warning, extra={"event": "config_warning"})
            # Reloads re-read the same file; in no-file mode the environment is fixed, so there is nothing to reload.
            reload = (lambda: load_config(args.config, environ)) if config.source is not None else None
            return run_until_signalled(lambda stop: serve(config, stop, load=reload))
        if args.command == "demo":
            logsetup.setup("text", "info", sys.stderr, libraries=True)  # aiohttp's refusals too, as in serve
            listen, admin = _address(args.listen), _address(args.admin_listen)
            return run_until_signalled(lambda stop: demo(listen, admin, args.token_ttl, stop))
        if args.command == "simulate":
            from .devtools.simulator import parse_tenant_spec

            try:
                tenants = [parse_tenant_spec(spec) for spec in args.tenant]
            except ValueError as exc:
                raise UsageError(f"--tenant: {exc}") from None
            listen = _address(args.listen)
            return run_until_signalled(lambda stop: simulate(listen, tenants, args.app_key, args.token_ttl, stop))
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return EXIT_CONFIG
    except UsageError as exc:
        print(f"st-proxy: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as exc:  # a port in use, a file that vanished
        print(f"st-proxy: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_FAILURE


def check_config(path: str | None, environ: Mapping[str, str]) -> int:
    config = load_config(path, environ)
    for line in summary(config):
        print(line)
    for warning in [*config.warnings, *_forward_proxy_warnings(config)]:
        print(f"warning: {warning}", file=sys.stderr)
    print("config ok")
    return EXIT_OK


def _forward_proxy_warnings(config: Config) -> list[str]:
    if config.forward_proxy is None:
        return []
    from .tls.forward import load_ca, unsignable

    outside = unsignable(config, load_ca(config.forward_proxy))
    if not outside:
        return []
    return [
        f"forward_proxy.ca_cert_file: the CA may not sign {', '.join(outside)} (its --permit list): CONNECTs to "
        "them will be refused; make the CA with --permit for every ServiceTitan host the apps call"
    ]


def limits_summary(config: Config) -> list[str]:
    """Pacing settings and where the shared state lives; a Redis URL only in its redacted form (docs/limits.md)."""
    limits = config.limits
    if limits is None:
        return ["limits: off (nothing paced; upstream 429s pass through)"]
    rate = f"{limits.rate_per_second:g}/s" if limits.rate_per_second else "unpaced"
    reports = f"{limits.reports_per_minute:g}/min" if limits.reports_per_minute else "unpaced"
    own = sorted((t for t in config.tenants.values() if t.rate_per_second), key=lambda t: int(t.tenant_id))
    return [
        f"limits: {rate} per tenant (burst {limits.burst}), max wait {limits.max_wait_seconds:g}s, "
        f"max {limits.max_concurrent_per_tenant or 'unlimited'} concurrent per tenant, reports {reports}, "
        f"retry_throttled {str(limits.retry_throttled).lower()}",
        *(f"  {t.tenant_id}: rate_per_second {t.rate_per_second:g}" for t in own),
        f"state: {config.state.describe()}",
    ]


def summary(config: Config) -> list[str]:
    """The redacted description printed by ``check-config``: ids, environments and secret sources, never a value."""
    routing = config.routing
    header = f"the {routing.tenant_header} header, then " if routing.tenant_header else ""
    lines = [
        f"config: {config.source or 'environment variables (no-file mode)'}",
        f"listen: {config.listen}  admin_listen: {config.admin_listen}",
        f"routing: {header}the /tenant/{{id}}/ path, then default_tenant {routing.default_tenant or '(none)'}",
        f"app_key: from {config.app_key_ref.describe()}",
        f"tenants: {len(config.tenants)}",
    ]
    for tenant in sorted(config.tenants.values(), key=lambda t: int(t.tenant_id)):
        env = tenant.environment
        lines.append(
            f"  {tenant.tenant_id}: environment {env.name} ({env.api_url}), client_id {tenant.client_id}, "
            f"client_secret from {tenant.client_secret_ref.describe()}, app_key from {tenant.app_key_ref.describe()}"
        )
    lines.extend(tls_sections.summary_lines(config))
    return lines + security_summary(config) + limits_summary(config)


async def demo(listen: Address, admin: Address, token_ttl: float, stop: asyncio.Event) -> int:
    from .devtools.simulator import DEMO_APP_KEY, DEMO_TENANTS, Simulator

    sim = Simulator(token_ttl=token_ttl)
    await sim.start("127.0.0.1", 0)
    raw = {
        "listen": str(listen),
        "admin_listen": str(admin),
        "app_key": {"value": DEMO_APP_KEY},
        "environments": {"simulator": {"auth_url": sim.auth_url, "api_url": sim.base_url}},
        "tenants": {
            t.tenant_id: {
                "environment": "simulator",
                "client_id": t.client_id,
                "client_secret": {"value": t.client_secret},
            }
            for t in DEMO_TENANTS
        },
    }
    config = from_mapping(raw, {})

    def ready(data: Address, admin_addr: Address) -> None:
        first, second = DEMO_TENANTS[0].tenant_id, DEMO_TENANTS[1].tenant_id
        lines = [
            f"st-proxy demo: simulator at {sim.base_url}, proxy at http://{data}, admin at http://{admin_addr}",
            "The proxy holds the demo tenants' credentials; the requests below carry none. Try:",
            "",
            f"  curl -s 'http://{data}/crm/v2/tenant/{first}/customers?page=1&pageSize=2'",
            f"  curl -s -H 'X-Tenant-ID: {second}' 'http://{data}/jpm/v2/tenant/{second}/jobs/42'",
            f"  curl -s 'http://{data}/crm/v2/tenant/999/customers'    # an unknown tenant: 403 from the proxy",
            f"  curl -s 'http://{admin_addr}/tenants'",
            f"  curl -s 'http://{admin_addr}/metrics' | grep '^st_proxy_requests_total'",
            "",
            "Ctrl-C stops it.",
        ]
        print("\n".join(lines), flush=True)

    try:
        return await serve(config, stop, on_ready=ready)
    finally:
        await sim.stop()


async def simulate(listen: Address, tenants: list, app_key: str | None, token_ttl: float, stop: asyncio.Event) -> int:
    from .devtools.simulator import DEMO_APP_KEY, DEMO_TENANTS, Simulator, describe

    sim = Simulator(tenants=tuple(tenants) or DEMO_TENANTS, app_keys=(app_key or DEMO_APP_KEY,), token_ttl=token_ttl)
    await sim.start(listen.host, listen.port)
    print(describe(sim), flush=True)
    try:
        await stop.wait()
    finally:
        await sim.stop()
    return EXIT_OK
