"""``st-proxy certs init`` and ``st-proxy certs issue``: the argument parsers and what they run."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .validity import CA_DAYS, LEAF_DAYS


def add_parser(sub: argparse._SubParsersAction) -> None:
    certs = sub.add_parser("certs", help="make a local CA and certificates for TLS and the forward-proxy mode")
    commands = certs.add_subparsers(dest="certs_command", required=True, metavar="ACTION")

    init = commands.add_parser("init", help="make a local CA (ca.crt, and ca.key with mode 0600)")
    init.add_argument("--out", required=True, help="directory for ca.crt and ca.key")
    init.add_argument(
        "--permit",
        action="append",
        default=[],
        metavar="NAME",
        help="a DNS name (and the names under it) or an IP network this CA may sign; repeatable. With it, the CA "
        "carries critical X.509 name constraints, so a stolen key cannot sign anything else",
    )
    init.add_argument("--name", default="st-proxy local CA", help="the CA's common name")
    init.add_argument("--days", type=int, default=CA_DAYS, help=f"validity in days (default {CA_DAYS})")

    issue = commands.add_parser("issue", help="sign a server certificate (tls.crt, tls.key) with a local CA")
    issue.add_argument("--ca", required=True, help="directory holding ca.crt and ca.key")
    issue.add_argument("--host", action="append", default=[], metavar="NAME", help="host name or IP; repeatable")
    issue.add_argument(
        "--client", metavar="NAME", help="make a client certificate for mTLS instead (client.crt, client.key)"
    )
    issue.add_argument("--out", required=True, help="directory for the certificate and key")
    issue.add_argument("--days", type=int, default=LEAF_DAYS, help=f"validity in days (default {LEAF_DAYS})")


def run(args: argparse.Namespace) -> int:
    """Exit 0 with the files written, or 2 with one line saying why not."""
    from .certs import CertError, LocalCA, write_ca, write_pair  # cryptography: loaded for these commands only

    try:
        if args.days < 1:
            raise CertError("--days must be at least 1")
        if args.certs_command == "init":
            ca = LocalCA.create(permit=args.permit, common_name=args.name, days=args.days)
            cert, key = write_ca(ca, Path(args.out))
            scope = ", ".join(args.permit) if args.permit else "any name (no --permit: see docs/tls.md)"
            print(f"wrote {cert} and {key} (mode 0600); this CA may sign: {scope}")
            return 0
        ca = LocalCA.load_dir(args.ca)
        if args.client and args.host:
            raise CertError("give --host for a server certificate or --client for a client certificate, not both")
        if args.client:
            pair = ca.issue([args.client], client=True, days=args.days)
            cert, key = write_pair(*pair, Path(args.out), names=("client.crt", "client.key"))
        elif args.host:
            cert, key = write_pair(*ca.issue(args.host, days=args.days), Path(args.out))
        else:
            raise CertError("name at least one --host (or --client NAME)")
        print(f"wrote {cert} and {key} (mode 0600), signed by {Path(args.ca)}")
        return 0
    except CertError as exc:
        print(f"st-proxy: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"st-proxy: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return 2
