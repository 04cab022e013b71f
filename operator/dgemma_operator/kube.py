"""The operator's few calls to the Kubernetes API, through the kubernetes client (I/O at the edge)."""

from __future__ import annotations

import json
import os
from importlib.metadata import version
from typing import Any

import kubernetes

from dgemma_operator import models
from dgemma_operator.children import MANAGER
from dgemma_operator.status import as_patch

Body = dict[str, Any]
APPLY = "application/apply-patch+yaml"
MERGE = "application/merge-patch+json"
REQUEST_TIMEOUT_S = 30


def load_config() -> kubernetes.client.ApiClient:
    """A client for the cluster the operator runs in, or the current kubeconfig context outside one."""
    configuration = kubernetes.client.Configuration()
    try:
        kubernetes.config.load_incluster_config(client_configuration=configuration)
    except kubernetes.config.ConfigException:
        # Read KUBECONFIG now: the kubernetes package reads it once, at import time.
        kubernetes.config.load_kube_config(
            config_file=os.environ.get("KUBECONFIG"), client_configuration=configuration
        )
    client = kubernetes.client.ApiClient(configuration)
    client.user_agent = f"{MANAGER}/{version('dgemma')}"
    return client


class Kube:
    """Typed wrappers over the calls the operator makes; answers are plain dicts."""

    def __init__(self, client: kubernetes.client.ApiClient) -> None:
        self.core = kubernetes.client.CoreV1Api(client)
        self.apps = kubernetes.client.AppsV1Api(client)
        self.policy = kubernetes.client.PolicyV1Api(client)
        self.custom = kubernetes.client.CustomObjectsApi(client)

    @staticmethod
    def _json(response: Any) -> Body:
        return dict(json.loads(response.data))

    def apply(self, child: Body) -> Body:
        """Server-side apply of a child object we own (creates it if missing; forces our fields back)."""
        name, namespace = child["metadata"]["name"], child["metadata"]["namespace"]
        common: dict[str, Any] = {
            "field_manager": MANAGER, "force": True, "_content_type": APPLY,
            "_preload_content": False, "_request_timeout": REQUEST_TIMEOUT_S,
        }
        kind = child["kind"]
        response: Any
        if kind == "Deployment":
            response = self.apps.patch_namespaced_deployment(name, namespace, child, **common)
        elif kind == "Service":
            response = self.core.patch_namespaced_service(name, namespace, child, **common)
        elif kind == "PodDisruptionBudget":
            response = self.policy.patch_namespaced_pod_disruption_budget(name, namespace, child, **common)
        else:
            raise ValueError(f"the operator does not manage {kind}")
        return self._json(response)

    def scale(self, namespace: str, name: str, replicas: int) -> None:
        """Set spec.replicas through the resource's scale subresource (as `kubectl scale` and HPA do)."""
        self.custom.patch_namespaced_custom_object_scale(
            models.GROUP, models.VERSION, namespace, models.PLURAL, name, {"spec": {"replicas": replicas}},
            _content_type=MERGE, _preload_content=False, _request_timeout=REQUEST_TIMEOUT_S,
        )

    def patch_status(self, namespace: str, name: str, status: models.DiffusionGemmaStatus,
                     resource_version: str | None = None) -> None:
        """Merge the fields set in `status` into the resource's status (other writers' fields are kept).

        With `resource_version`, only if the resource is still at that version (else 409 Conflict)."""
        patch: Body = {"status": as_patch(status)}
        if resource_version is not None:
            patch["metadata"] = {"resourceVersion": resource_version}
        self.custom.patch_namespaced_custom_object_status(
            models.GROUP, models.VERSION, namespace, models.PLURAL, name, patch,
            _content_type=MERGE, _preload_content=False, _request_timeout=REQUEST_TIMEOUT_S,
        )
