"""spec.worker.apiKeySecret and spec.worker.env: a dgemma worker gets the Secret's key as its keys file (mounted in
the server container only, DGEMMA_API_KEYS_FILE), vLLM is started with its first key by a launcher reading the same
mount by the same rule as every key reader; extra variables
come after the operator's and may not replace one of them (the resource is Degraded, naming it). The API server
enforces the shapes; the operator reconciles them into the Deployment."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
from typing import Any

import kubernetes_validate
import pytest
from kopf.testing import KopfRunner

from dgemma_common.auth import ApiKeys
from dgemma_gateway.kube import presented_key
from dgemma_operator import children, models
from tests.k8s_emulator import EmulatorThread
from tests.operator.helpers import apply, condition, eventually, exists, get, sample

OWNER = {"metadata": {"name": "gemma", "namespace": "ml", "uid": "1234", "generation": 1}}
KEY = {"name": "gemma-worker-key", "key": "api-key"}
OTEL = [{"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": "http://otel-collector.monitoring:4317"},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "OTEL_RESOURCE_ATTRIBUTES", "value": "k8s.pod.name=$(POD_NAME)"}]


def spec(runtime: str = "dgemma", **worker: Any) -> models.DiffusionGemmaSpec:
    return models.DiffusionGemmaSpec.model_validate({
        "servedModelName": "m", "runtime": runtime, "worker": worker,
        "model": {"huggingFace": {"id": "google/diffusiongemma-26B-A4B-it"}},
        **({"image": "ghcr.io/example/dgemma:0.1.0"} if runtime == "dgemma" else {}),
    })


def pod(s: models.DiffusionGemmaSpec) -> dict[str, Any]:
    return dict(children.deployment(OWNER, s)["spec"]["template"]["spec"])


def test_a_dgemma_worker_reads_the_key_from_the_secret_mounted_in_its_own_container_only() -> None:
    s = spec(apiKeySecret=KEY)
    p = pod(s)
    worker, fetch = p["containers"][0], p["initContainers"][0]
    assert {"name": "api-keys", "secret": {"secretName": "gemma-worker-key", "defaultMode": 0o440,
                                           "items": [{"key": "api-key", "path": "keys"}]}} in p["volumes"]
    assert {"name": "api-keys", "mountPath": "/etc/dgemma/api-keys", "readOnly": True} in worker["volumeMounts"]
    assert all(m["name"] != "api-keys" for m in fetch["volumeMounts"])  # the downloader never sees the key
    assert {"name": "DGEMMA_API_KEYS_FILE", "value": "/etc/dgemma/api-keys/keys"} in worker["env"]
    assert worker["readinessProbe"]["grpc"] == {"port": 50051}  # health stays open: probes need no key
    plain = pod(spec())
    assert all(v["name"] != "api-keys" for v in plain["volumes"])
    assert all(e["name"] != "DGEMMA_API_KEYS_FILE" for e in plain["containers"][0]["env"])
    kubernetes_validate.validate(children.deployment(OWNER, s), "1.33", strict=True)


def test_a_vllm_server_reads_the_key_from_the_secret_mounted_in_its_own_container_only() -> None:
    p = pod(spec("vllm", apiKeySecret=KEY))
    (server,) = p["containers"]
    assert {"name": "api-keys", "secret": {"secretName": "gemma-worker-key", "defaultMode": 0o440,
                                           "items": [{"key": "api-key", "path": "keys"}]}} in p["volumes"]
    assert {"name": "api-keys", "mountPath": "/etc/dgemma/api-keys", "readOnly": True} in server["volumeMounts"]
    assert all(m["name"] != "api-keys" for m in p["initContainers"][0]["volumeMounts"])
    assert all(e["name"] != "VLLM_API_KEY" for e in server["env"])  # set by the launcher, from the file
    # /health (the probes) and /metrics (scraping) are outside the /v1 paths vLLM's key guards.
    assert server["readinessProbe"]["httpGet"]["path"] == "/health"
    plain = pod(spec("vllm"))["containers"][0]
    assert plain["command"] == ["vllm", "serve"] and all(e["name"] != "VLLM_API_KEY" for e in plain["env"])
    kubernetes_validate.validate(children.deployment(OWNER, spec("vllm", apiKeySecret=KEY)), "1.33", strict=True)


FAKE_VLLM = """#!/bin/sh
# Stands in for vLLM's CLI: records how it was started (vLLM reads its key from VLLM_API_KEY, compared whole).
exec "$PYTHON" -c 'import json, os, sys; json.dump({"argv": sys.argv[1:], "key": os.environ.get("VLLM_API_KEY")},
    open(os.environ["RECORD"], "w"))' "$@"
"""


def start_like_the_kubelet(p: dict[str, Any], secret_value: str, folder: pathlib.Path) -> tuple[int, str, Any]:
    """Run the pod's server container as a kubelet would, on this machine: the Secret's value in its volume (the
    mount point moved under `folder`), `secretKeyRef` variables resolved to the whole value, and `vllm` on the
    PATH a stand-in that records its arguments and VLLM_API_KEY. Returns the exit code, stderr and the record."""
    (server,) = p["containers"]
    mounts = {}
    for mount in server.get("volumeMounts", []):
        volume = next(v for v in p["volumes"] if v["name"] == mount["name"])
        if "secret" in volume:
            local = folder / mount["name"]
            local.mkdir()
            for item in volume["secret"]["items"]:
                (local / item["path"]).write_text(secret_value)
            mounts[mount["mountPath"]] = str(local)
    env = {e["name"]: e["value"] for e in server["env"] if "value" in e}
    env.update({e["name"]: secret_value for e in server["env"] if "secretKeyRef" in e.get("valueFrom", {})})
    bin_dir = folder / "bin"
    bin_dir.mkdir()
    (bin_dir / "vllm").write_text(FAKE_VLLM)
    (bin_dir / "vllm").chmod(0o755)
    record = folder / "started.json"
    env.update(PATH=f"{bin_dir}:/usr/bin:/bin", PYTHON=sys.executable, RECORD=str(record))

    def local(arg: str) -> str:
        for path, there in mounts.items():
            arg = arg.replace(path, there)
        return arg

    argv = [local(a) for a in [*server["command"], *server["args"]]]
    argv[0] = sys.executable if argv[0] in ("python", "python3") else argv[0]  # the image's python
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    return done.returncode, done.stderr, json.loads(record.read_text()) if record.exists() else None


# What `kubectl create secret --from-file` makes of an echoed file, a CRLF file, a rotation, an option.
SECRET_VALUES = ["wk-0123\n", "wk-0123", "  wk-0123\r\n\n", "# rotating\nwk-new\nwk-old\n", "wk-0123 no-overflow\n"]


@pytest.mark.parametrize("value", SECRET_VALUES)
def test_a_vllm_pod_starts_with_the_key_the_gateway_presents(value: str, tmp_path: pathlib.Path) -> None:
    """vLLM compares its key whole: the pod must get exactly the key the gateway reads from the same Secret (a
    trailing newline once made every gateway request a 401)."""
    p = pod(spec("vllm", apiKeySecret=KEY))
    code, stderr, started = start_like_the_kubelet(p, value, tmp_path)
    assert code == 0, stderr
    presented = presented_key(value)
    assert presented is not None and started["key"] == presented
    assert started["argv"] == ["serve", *p["containers"][0]["args"]]  # vLLM gets its arguments untouched
    (tmp_path / "worker-keys").write_text(value)
    ApiKeys(tmp_path / "worker-keys").check({"authorization": f"Bearer {presented}"}.get)  # a dgemma worker agrees


def test_a_vllm_pod_without_a_key_in_its_secret_does_not_start_open(tmp_path: pathlib.Path) -> None:
    """vLLM with an empty key checks nothing: the launcher refuses to start it, naming the file."""
    code, stderr, started = start_like_the_kubelet(pod(spec("vllm", apiKeySecret=KEY)), "\n# none yet\n", tmp_path)
    assert code != 0 and started is None
    assert "holds no API key" in stderr and "spec.worker.apiKeySecret" in stderr


@pytest.mark.parametrize("runtime", ["dgemma", "vllm"])
def test_extra_variables_follow_the_operators_in_the_server_container(runtime: str) -> None:
    deployment = children.deployment(OWNER, spec(runtime, env=OTEL))
    server = deployment["spec"]["template"]["spec"]["containers"][0]
    names = [e["name"] for e in server["env"]]
    assert server["env"][-3:] == OTEL  # as given, after the operator's own, so $(NAME) can refer to those
    assert len(names) == len(set(names))
    assert all("OTEL" not in e["name"] for c in deployment["spec"]["template"]["spec"].get("initContainers", [])
               for e in c.get("env", []))
    kubernetes_validate.validate(deployment, "1.33", strict=True)


@pytest.mark.parametrize(("runtime", "env", "problem"), [
    ("dgemma", [{"name": "DGEMMA_MAX_ACTIVE", "value": "64"}], "worker.env: DGEMMA_MAX_ACTIVE is set by the operator"),
    ("dgemma", [{"name": "HF_HOME", "value": "/x"}, {"name": "DGEMMA_VARIANT", "value": "y"}],
     "worker.env: DGEMMA_VARIANT, HF_HOME are set by the operator"),
    ("vllm", [{"name": "VLLM_CACHE_ROOT", "value": "/x"}], "VLLM_CACHE_ROOT is set by the operator"),
    ("dgemma", [{"name": "A", "value": "1"}, {"name": "A", "value": "2"}], "worker.env: A given more than once"),
])
def test_a_variable_the_operator_sets_cannot_be_overridden(runtime: str, env: list[dict[str, Any]],
                                                           problem: str) -> None:
    assert problem in " ".join(children.semantic_problems("gemma", spec(runtime, env=env)))


def test_the_key_variable_of_an_api_key_secret_is_the_operators() -> None:
    key_env = [{"name": "DGEMMA_API_KEYS_FILE", "value": "/elsewhere"}]
    assert children.semantic_problems("gemma", spec(env=key_env)) == []  # a worker flag the resource does not set
    assert "DGEMMA_API_KEYS_FILE is set by the operator" in " ".join(
        children.semantic_problems("gemma", spec(apiKeySecret=KEY, env=key_env)))
    vllm_env = [{"name": "VLLM_API_KEY", "value": "k"}]
    assert "VLLM_API_KEY is set" in " ".join(children.semantic_problems("gemma", spec("vllm", apiKeySecret=KEY,
                                                                                     env=vllm_env)))


def test_an_external_variant_takes_neither() -> None:
    external = models.DiffusionGemmaSpec.model_validate({
        "servedModelName": "m", "runtime": "external", "external": {"baseURL": "https://api.example/v1", "model": "m"},
        "worker": {"apiKeySecret": KEY}})
    assert any("worker.apiKeySecret and worker.env are for runtimes that run pods" in p
               for p in children.semantic_problems("gemma", external))


@pytest.mark.parametrize(("worker", "message"), [
    ({"env": [{"name": "A", "value": "1", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]},
     "give value or valueFrom, not both"),
    ({"env": [{"name": "A", "valueFrom": {}}]}, "valueFrom needs one of"),
    ({"env": [{"name": "A", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"},
                                          "secretKeyRef": {"name": "s", "key": "k"}}}]}, "valueFrom takes only one"),
    ({"env": [{"name": "1A", "value": "1"}]}, "spec.worker.env[0].name"),
    ({"apiKeySecret": {"name": ""}}, "spec.worker.apiKeySecret.name"),
])
def test_the_api_server_enforces_the_shapes(k8s: EmulatorThread, crd: None, worker: dict[str, Any],
                                            message: str) -> None:
    out = apply(k8s, sample("bad", worker=worker), check=False)
    assert "is invalid" in out and message in out, out


def test_the_api_server_refuses_a_worker_key_for_an_external_variant(k8s: EmulatorThread, crd: None) -> None:
    hosted = sample("hosted", runtime="external", external={"baseURL": "https://api.example/v1", "model": "m"},
                    worker={"apiKeySecret": KEY})
    del hosted["spec"]["model"], hosted["spec"]["image"]
    assert "are for runtimes that run pods" in apply(k8s, hosted, check=False)
    del hosted["spec"]["worker"]
    assert "created" in apply(k8s, hosted)


def test_the_operator_mounts_the_key_and_refuses_to_override_its_own_variables(
        k8s: EmulatorThread, operator: KopfRunner) -> None:
    apply(k8s, sample(worker={"apiKeySecret": KEY, "env": OTEL}))
    dep = eventually(lambda: exists(k8s, "deployment", "gemma-worker") and get(k8s, "deployment", "gemma-worker"))
    server = dep["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "DGEMMA_API_KEYS_FILE", "value": "/etc/dgemma/api-keys/keys"} in server["env"]
    assert server["env"][-3:] == OTEL

    apply(k8s, sample(worker={"apiKeySecret": KEY, "env": [{"name": "DGEMMA_PORT", "value": "1"}]}))

    def degraded() -> dict[str, Any]:
        cond = condition(get(k8s, "dgm", "gemma"), "Degraded")
        assert cond["reason"] == "InvalidSpec"
        return cond

    assert "worker.env: DGEMMA_PORT is set by the operator" in eventually(degraded)["message"]
    events = json.loads(k8s.kubectl("get", "events", "-o", "json").stdout)["items"]
    assert any(e["reason"] == "InvalidSpec" and "DGEMMA_PORT" in e.get("message", "") for e in events)
    # The Deployment keeps the last valid spec: the workers are not restarted into a broken one.
    assert get(k8s, "deployment", "gemma-worker")["spec"]["template"]["spec"]["containers"][0]["env"][-3:] == OTEL
