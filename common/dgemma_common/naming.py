"""Names that one process gives and another looks for: the custom resource, the worker Service and its ports,
label keys. The operator creates objects with these names and the gateway finds them by the same names, so
neither spells them itself. A variant's own name is `dgemma_common.variants.variant_name`."""

from __future__ import annotations

# The custom resource (its schema is generated from the operator's pydantic models).
GROUP = "dgemma.io"
VERSION = "v1alpha1"
KIND = "DiffusionGemma"
PLURAL = "diffusiongemmas"

# Ports (Triton's 8000/8001 convention at the gateway).
WORKER_GRPC_PORT = 50051
WORKER_METRICS_PORT = 9090
WORKER_HEALTH_PORT = 50052  # plaintext gRPC health only, for the kubelet's probes when the worker serves TLS
GATEWAY_HTTP_PORT = 8000
GATEWAY_GRPC_PORT = 8001
OPERATOR_HEALTH_PORT = 8080
# Port names in the worker Service (and so in its EndpointSlices): a dgemma worker's gRPC and metrics, or a
# vLLM server's OpenAI API (which serves /metrics too). The name tells the gateway how to talk to the pods.
GRPC_PORT_NAME = "grpc"
METRICS_PORT_NAME = "metrics"
HTTP_PORT_NAME = "http"

# Labels. The operator sets the dgemma.io ones on the worker pods and children; Kubernetes sets
# SERVICE_NAME_LABEL on each EndpointSlice of a Service.
VARIANT_LABEL = f"{GROUP}/variant"
MODEL_LABEL = f"{GROUP}/model"
RUNTIME_LABEL = f"{GROUP}/runtime"  # only on a vLLM variant's (a dgemma variant's workers are not relabelled)
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
MANAGER = "dgemma-operator"  # the operator's field manager and app.kubernetes.io/managed-by value

WORKER_SUFFIX = "-worker"


def worker_service(resource_name: str) -> str:
    """The worker Service of a resource (also its Deployment's and PodDisruptionBudget's name)."""
    return f"{resource_name}{WORKER_SUFFIX}"


def worker_address(resource_name: str, namespace: str) -> str:
    """The workers' in-cluster gRPC address (host:port) through their Service."""
    return f"{worker_service(resource_name)}.{namespace}.svc:{WORKER_GRPC_PORT}"

