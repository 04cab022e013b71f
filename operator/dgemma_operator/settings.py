"""Operator-wide settings that kopf needs when the handlers are registered: read from the environment.

`dgemma operator --gateway-url ... --autoscale-interval-s ...` sets these variables before it imports the
handlers; under `kopf run -m dgemma_operator.handlers` (tests) set them directly.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from dgemma_common.naming import GATEWAY_HTTP_PORT

GATEWAY_URL_ENV = "DGEMMA_GATEWAY_URL"
AUTOSCALE_INTERVAL_ENV = "DGEMMA_AUTOSCALE_INTERVAL_S"
GATEWAY_TIMEOUT_ENV = "DGEMMA_GATEWAY_TIMEOUT_S"
METRICS_PORT_ENV = "DGEMMA_OPERATOR_METRICS_PORT"
GATEWAY_CA_ENV = "DGEMMA_GATEWAY_CA_FILE"
# The chart's gateway Service, in the operator's own namespace.
DEFAULT_GATEWAY = "http://dgemma-gateway.{namespace}.svc:" + str(GATEWAY_HTTP_PORT)


@dataclass(frozen=True)
class OperatorSettings:
    """Where the gateway's demand measurements are, and how often the autoscaler decides."""

    gateway_url: str
    autoscale_interval_s: float = 15.0
    gateway_timeout_s: float = 5.0
    metrics_port: int | None = None  # the Prometheus endpoint (0: any free port; None: not served)
    gateway_ca_file: str | None = None  # the CA of an HTTPS gateway's certificate (default: the system's)

    @property
    def demand_url(self) -> str:
        """The gateway's demand snapshot (JSON)."""
        return f"{self.gateway_url.rstrip('/')}/v1/dgemma/demand"


def from_environment(env: Mapping[str, str] | None = None) -> OperatorSettings:
    """Settings from DGEMMA_* variables; the gateway defaults to the chart's Service in POD_NAMESPACE."""
    env = os.environ if env is None else env
    namespace = env.get("POD_NAMESPACE") or "dgemma-system"
    return OperatorSettings(
        gateway_url=env.get(GATEWAY_URL_ENV) or DEFAULT_GATEWAY.format(namespace=namespace),
        autoscale_interval_s=float(env.get(AUTOSCALE_INTERVAL_ENV) or 15.0),
        gateway_timeout_s=float(env.get(GATEWAY_TIMEOUT_ENV) or 5.0),
        metrics_port=int(env[METRICS_PORT_ENV]) if env.get(METRICS_PORT_ENV) else None,
        gateway_ca_file=env.get(GATEWAY_CA_ENV) or None,
    )
