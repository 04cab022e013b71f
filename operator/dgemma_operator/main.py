"""`dgemma operator`: run the kopf operator (called by the dgemma CLI)."""

from __future__ import annotations

import argparse
import os
from typing import Any

from dgemma_operator import settings

LIVENESS_PATH = "/healthz"
DEFAULT_METRICS_PORT = 9090


def parser() -> argparse.ArgumentParser:
    """The `dgemma operator` command line."""
    p = argparse.ArgumentParser(prog="dgemma operator", description="Run the DiffusionGemma operator.")
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("--namespace", "-n", action="append", default=[], metavar="NS",
                       help="watch this namespace (repeatable; globs allowed, e.g. 'team-*')")
    scope.add_argument("--all-namespaces", "-A", action="store_true", help="watch the whole cluster")
    p.add_argument("--liveness-port", type=int, default=8080, help="port of the /healthz endpoint (0: none)")
    p.add_argument("--metrics-port", type=int, default=None,
                   help="port of the Prometheus /metrics endpoint (-1: none) "
                        f"[env {settings.METRICS_PORT_ENV}; default {DEFAULT_METRICS_PORT}]")
    peering = p.add_mutually_exclusive_group()
    peering.add_argument("--peering", metavar="NAME", default=None,
                         help="KopfPeering/ClusterKopfPeering used so that one instance is active at a time")
    peering.add_argument("--standalone", action="store_true", help="no peering: assume a single instance")
    p.add_argument("--priority", type=int, default=0, help="peering priority of this instance")
    p.add_argument("--verbose", action="store_true", help="debug logging")
    default_gateway = settings.DEFAULT_GATEWAY.format(namespace="$POD_NAMESPACE")
    p.add_argument("--gateway-url", default=None,
                   help="the gateway whose demand measurements the autoscaler reads "
                        f"[env {settings.GATEWAY_URL_ENV}; default {default_gateway}]")
    p.add_argument("--autoscale-interval-s", type=float, default=None,
                   help=f"seconds between autoscaling decisions [env {settings.AUTOSCALE_INTERVAL_ENV}; default 15]")
    return p


def export_settings(args: argparse.Namespace) -> None:
    """Hand the autoscaler's flags to the handlers module through its environment variables (flags win)."""
    if args.gateway_url:
        os.environ[settings.GATEWAY_URL_ENV] = args.gateway_url
    port = args.metrics_port if args.metrics_port is not None else int(
        os.environ.get(settings.METRICS_PORT_ENV) or DEFAULT_METRICS_PORT)
    if port < 0:
        os.environ.pop(settings.METRICS_PORT_ENV, None)
    else:
        os.environ[settings.METRICS_PORT_ENV] = str(port)
    if args.autoscale_interval_s is not None:
        if args.autoscale_interval_s <= 0:
            raise SystemExit("dgemma operator: --autoscale-interval-s must be > 0")
        os.environ[settings.AUTOSCALE_INTERVAL_ENV] = str(args.autoscale_interval_s)


def kopf_options(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments for kopf.run from parsed command-line arguments."""
    options: dict[str, Any] = {
        "standalone": bool(args.standalone),
        "priority": args.priority,
        "clusterwide": bool(args.all_namespaces or not args.namespace),
        "namespaces": list(args.namespace),
    }
    if args.peering:
        options["peering_name"] = args.peering
    if args.liveness_port:
        options["liveness_endpoint"] = f"http://0.0.0.0:{args.liveness_port}{LIVENESS_PATH}"
    return options


def run(argv: list[str]) -> int:
    """Run the operator until it is stopped; returns the exit status."""
    args = parser().parse_args(argv)
    export_settings(args)
    import kopf

    from dgemma_operator import handlers  # noqa: F401  # registers the handlers

    kopf.configure(verbose=args.verbose, log_format=kopf.LogFormat.JSON)
    kopf.run(**kopf_options(args))
    return 0
