"""spec.runtime: a vLLM variant becomes `vllm serve` pods on the same GPUs, drained and guarded alike, probed on
/health; an external variant runs nothing and is ready at once. The examples under deploy/examples are
reconciled in the emulator by the operator, with kubectl as the client, into exactly those children."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kopf.testing import KopfRunner

from dgemma_common import vllm
from dgemma_operator import children, models
from tests.k8s_emulator import EmulatorThread
from tests.operator.helpers import apply, condition, eventually, exists, get, mark_ready

EXAMPLES = Path(__file__).resolve().parent.parent.parent / "deploy" / "examples"
OWNER = {"metadata": {"name": "gemma", "namespace": "ml", "uid": "1234", "generation": 1}}


def spec(**overrides: Any) -> models.DiffusionGemmaSpec:
    body: dict[str, Any] = {
        "servedModelName": "google/diffusiongemma-26B-A4B-it", "runtime": "vllm",
        "model": {"huggingFace": {"id": "google/diffusiongemma-26B-A4B-it", "revision": "abc123"},
                  "tokenSecret": {"name": "hf"}},
    }
    body.update(overrides)
    return models.DiffusionGemmaSpec.model_validate(body)


def example(name: str) -> dict[str, Any]:
    return dict(yaml.safe_load((EXAMPLES / name).read_text()))


def test_a_vllm_variant_runs_vllm_serve_with_the_recipe_settings_for_its_gpu() -> None:
    dep = children.deployment(OWNER, spec(gpu={"profile": "h100"}))
    pod = dep["spec"]["template"]["spec"]
    (server,) = pod["containers"]
    assert server["image"] == vllm.IMAGE and server["command"] == ["vllm", "serve"]
    args = server["args"]
    assert args[:3] == ["google/diffusiongemma-26B-A4B-it", "--revision", "abc123"]

    def flag(name: str) -> str:
        return str(args[args.index(name) + 1])

    assert flag("--served-model-name") == "google/diffusiongemma-26B-A4B-it" and flag("--port") == "8000"
    assert (flag("--max-num-seqs"), flag("--gpu-memory-utilization"), flag("--dtype")) == ("4", "0.85", "bfloat16")
    assert json.loads(flag("--diffusion-config")) == {"canvas_length": 256, "max_denoising_steps": 48}
    assert flag("--shutdown-timeout") == "30" and flag("--tensor-parallel-size") == "1"
    assert server["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert server[probe]["httpGet"] == {"path": "/health", "port": "http"}
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in server["env"]}
    assert env["HF_HUB_OFFLINE"] == "1" and env["HF_TOKEN"] == {"secretKeyRef": {"name": "hf", "key": "token",
                                                                                  "optional": False}}
    # The same GPU scheduling, drain and hardening as a dgemma worker.
    worker = children.deployment(OWNER, spec(runtime="dgemma", image="w:1"))["spec"]["template"]["spec"]
    for key in ("nodeSelector", "tolerations", "terminationGracePeriodSeconds", "volumes"):
        assert pod[key] == worker[key], key
    assert server["resources"] == worker["containers"][0]["resources"]
    assert server["lifecycle"] == worker["containers"][0]["lifecycle"]
    assert server["securityContext"]["readOnlyRootFilesystem"] and pod["securityContext"]["runAsUser"] == 2000
    assert pod["initContainers"][0]["image"] == vllm.IMAGE  # fetches the weights with vLLM's own `hf`
    kubernetes_validate.validate(dep, "1.33", strict=True)


def test_vllm_settings_and_the_profile_change_the_arguments_and_extra_args_come_last() -> None:
    s = spec(gpu={"profile": "dgx-spark", "count": 2},
             vllm={"maxNumSeqs": 2, "maxModelLen": 32768, "extraArgs": ["--max-num-seqs", "3"]})
    args = children.vllm_args("gemma", s)
    assert args[-2:] == ["--max-num-seqs", "3"]
    assert "--attention-backend" in args and "--dtype" not in args  # NVFP4 checkpoints carry their own config
    assert args[args.index("--tensor-parallel-size") + 1] == "2" and "32768" in args
    fp8 = children.vllm_args("gemma", spec(gpu={"profile": "h100", "dtype": "fp8"}))
    assert fp8[fp8.index("--quantization") + 1] == "fp8"
    pvc = spec(model={"pvc": {"claimName": "tuned", "path": "ckpt"}})
    assert children.vllm_args("gemma", pvc)[0] == "/model-source/ckpt"
    assert "initContainers" not in children.deployment(OWNER, pvc)["spec"]["template"]["spec"]


def test_a_vllm_service_exposes_its_http_port_and_an_external_variant_has_no_children() -> None:
    svc = children.service(OWNER, spec())
    assert svc["spec"]["ports"] == [{"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP",
                                     "appProtocol": "http"}]
    assert svc["metadata"]["labels"][children.RUNTIME_LABEL] == "vllm"
    assert children.endpoint("gemma", "ml", spec()) == "http://gemma-worker.ml.svc:8000/v1"
    external = spec(runtime="external", model=None,
                    external={"baseURL": "https://api.example.com/v1", "model": "dg"})
    assert children.children(OWNER, external) == []
    assert children.endpoint("gemma", "ml", external) == "https://api.example.com/v1"


@pytest.mark.parametrize(("overrides", "problem"), [
    ({"runtime": "dgemma"}, "needs image"),
    ({"runtime": "external"}, "external section"),
    ({"generation": {"tMin": 0.2}}, "tMin"),
    ({"runtime": "external", "external": {"baseURL": "http://x/v1", "model": "m"}, "autoscaling": {"enabled": True}},
     "no replicas to autoscale"),
])
def test_runtime_rules_the_crd_states_are_checked_again_by_the_operator(overrides: dict[str, Any], problem: str
                                                                         ) -> None:
    assert any(problem in p for p in children.semantic_problems("gemma", spec(**overrides)))


def test_the_api_server_enforces_the_runtime_rules_and_keeps_runtime_immutable(
        k8s: EmulatorThread, crd: None) -> None:
    vllm_example = {**example("h100-vllm.yaml"), "metadata": {"name": "v", "namespace": "default"}}
    apply(k8s, vllm_example)
    changed = json.loads(json.dumps(vllm_example))
    changed["spec"]["runtime"] = "dgemma"
    changed["spec"]["image"] = "w:1"
    changed["spec"].pop("vllm")
    out = apply(k8s, changed, check=False)
    assert "runtime is immutable" in out
    fixed = json.loads(json.dumps(vllm_example))
    fixed["spec"]["generation"]["tMin"] = 0.3
    assert "cannot be set for runtime vllm" in apply(k8s, fixed, check=False)
    no_api = {**example("hosted-overflow.yaml"), "metadata": {"name": "e", "namespace": "default"}}
    no_api["spec"] = {k: v for k, v in no_api["spec"].items() if k != "external"}
    assert "needs the external section" in apply(k8s, no_api, check=False)


def test_the_vllm_and_external_examples_reconcile_into_their_children(k8s: EmulatorThread,
                                                                      operator: KopfRunner) -> None:
    for name in ("h100-vllm.yaml", "hosted-overflow.yaml"):
        k8s.kubectl("apply", "-n", "default", "-f", str(EXAMPLES / name))
    dep = eventually(lambda: exists(k8s, "deployment", "gemma-h100-vllm-worker")
                     and get(k8s, "deployment", "gemma-h100-vllm-worker"))
    assert dep["spec"]["template"]["spec"]["containers"][0]["command"] == ["vllm", "serve"]
    assert get(k8s, "service", "gemma-h100-vllm-worker")["spec"]["ports"][0]["name"] == "http"
    assert exists(k8s, "pdb", "gemma-h100-vllm-worker")
    mark_ready(k8s, "gemma-h100-vllm-worker", 1)

    def ready(name: str, reason: str) -> dict[str, Any]:
        resource = get(k8s, "dgm", name)
        assert condition(resource, "Ready")["reason"] == reason
        return resource

    vllm_status = eventually(lambda: ready("gemma-h100-vllm", "AllReplicasReady"))["status"]
    assert vllm_status["endpoint"] == "http://gemma-h100-vllm-worker.default.svc:8000/v1"
    assert vllm_status["tokensPerSecondPrior"] == 1282.0
    external = eventually(lambda: ready("gemma-hosted-overflow", "External"))
    assert external["status"]["endpoint"] == "https://integrate.api.nvidia.com/v1"
    assert external["status"]["replicas"] == 0
    # Nothing runs for the external variant.
    for kind in ("deployment", "service", "pdb"):
        assert not exists(k8s, kind, "gemma-hosted-overflow-worker")
    table = k8s.kubectl("get", "dgm", "-n", "default").stdout
    assert "RUNTIME" in table and "vllm" in table and "external" in table
    events = json.loads(k8s.kubectl("get", "events", "-o", "json").stdout)["items"]
    reasons = {(e["involvedObject"]["name"], e["reason"]) for e in events}
    assert ("gemma-h100-vllm", "CreatedWorkers") in reasons and ("gemma-hosted-overflow", "CreatedWorkers") in reasons
