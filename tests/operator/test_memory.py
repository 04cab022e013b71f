"""A worker pod's memory: host memory on discrete GPUs, the GPU's memory too on unified-memory nodes (a vLLM
server's: its --gpu-memory-utilization share of the node)."""

from __future__ import annotations

from typing import Any

import pytest

from dgemma_common import profiles
from dgemma_operator import children
from tests.operator.test_children import pod, spec
from tests.operator.test_runtimes import spec as vllm_spec

GIB = 2**30
DISCRETE = ["h100", "rtx-pro-6000", "dgx-station", "custom"]


def resources(**overrides: Any) -> dict[str, Any]:
    if overrides.get("gpu", {}).get("profile") == "custom":
        overrides["gpu"] = {**overrides["gpu"], "product": "NVIDIA-L40S"}
    return dict(pod(spec(**overrides))["containers"][0]["resources"])


def gib(quantity: str) -> int:
    assert quantity.endswith("Gi"), quantity
    return int(quantity[:-2])


@pytest.mark.parametrize("name", [*DISCRETE, "dgx-spark"])
def test_the_memory_request_equals_the_limit_so_the_scheduler_reserves_what_the_pod_may_use(name: str) -> None:
    r = resources(gpu={"profile": name})
    assert r["requests"]["memory"] == r["limits"]["memory"]


@pytest.mark.parametrize("name", DISCRETE)
def test_a_discrete_gpu_pod_asks_only_for_host_memory_whatever_it_serves(name: str) -> None:
    sizes = {
        resources(gpu={"profile": name, "dtype": dtype}, worker={"maxActive": active})["limits"]["memory"]
        for dtype in ("bf16", "fp32") for active in (1, 64)
    }
    assert sizes == {"16Gi"}


def test_the_discrete_allowance_covers_the_process_and_four_tensors_in_flight_while_loading() -> None:
    embedding = 262144 * 2816 * 2  # the checkpoint's largest tensor, bf16
    process = 6 * GIB
    assert process + 4 * embedding <= profiles.HOST_MEMORY_GIB * GIB


def test_a_dgx_spark_pod_reserves_the_bf16_weights_on_top_of_the_host_allowance() -> None:
    r = resources(gpu={"profile": "dgx-spark"})
    weights = 52e9  # the 26B checkpoint in bf16
    assert gib(r["requests"]["memory"]) * GIB >= profiles.HOST_MEMORY_GIB * GIB + weights
    assert r["requests"]["memory"] == "86Gi"  # the default: bf16, maxActive 4, canvas 256 (docs/operator.md)


def test_unified_memory_grows_with_active_requests_and_the_canvas_and_shrinks_with_the_dtype() -> None:
    def memory(**worker_gen: Any) -> int:
        return gib(resources(gpu={"profile": "dgx-spark", "dtype": worker_gen.pop("dtype", "bf16")},
                             **worker_gen)["requests"]["memory"])

    one, four = memory(worker={"maxActive": 1}), memory(worker={"maxActive": 4})
    assert four - one >= 3 * profiles.KV_CACHE_GIB_PER_SLOT  # every active request brings its KV cache
    assert memory(generation={"canvasLength": 1024}) > memory(generation={"canvasLength": 256})
    by_dtype = [memory(dtype=d) for d in ("nvfp4", "fp8", "bf16", "fp32")]
    assert by_dtype == sorted(by_dtype) and len(set(by_dtype)) == 4


def test_the_kv_allowance_holds_the_largest_buckets_cache_of_the_checkpoints_layers() -> None:
    bf16 = 2
    full = 5 * profiles.LARGEST_BUCKET * 2 * 2 * 512 * bf16  # 5 full-attention layers, 2 KV heads x 512, K and V
    sliding = 25 * 1023 * 2 * 8 * 256 * bf16  # 25 sliding layers keep their last 1023 tokens, 8 KV heads x 256
    assert (full + sliding) / GIB <= profiles.KV_CACHE_GIB_PER_SLOT < 1.1 * (full + sliding) / GIB
    assert profiles.LARGEST_BUCKET >= 32768 + 8192  # the longest context the worker accepts fits it


def test_weights_in_each_dtype_keep_the_unquantized_parts_in_bf16() -> None:
    assert profiles.weights_gib("bf16") == pytest.approx(52e9 / GIB)
    assert profiles.weights_gib("fp32") == pytest.approx(2 * profiles.weights_gib("bf16"))
    kept = profiles.KEPT_BF16_PARAMETERS * 2 / GIB
    assert profiles.weights_gib("fp8") == pytest.approx((profiles.weights_gib("bf16") - kept) / 2 + kept)
    assert profiles.weights_gib("nvfp4") == pytest.approx((profiles.weights_gib("bf16") - kept) * 4.5 / 16 + kept)


def test_a_unified_memory_spec_larger_than_the_node_is_a_problem_unless_the_memory_is_given() -> None:
    big = {"gpu": {"profile": "dgx-spark", "dtype": "fp32"}, "worker": {"maxActive": 16}}
    (problem,) = children.semantic_problems("gemma", spec(**big))
    assert problem.startswith("worker.maxActive: 16 requests in fp32 need 187Gi of unified memory, more than a "
                              "dgx-spark node's 119Gi")
    given = {**big, "gpu": {**big["gpu"], "resources": {"limits": {"memory": "100Gi"}}}}
    assert children.semantic_problems("gemma", spec(**given)) == []
    r = resources(**given)
    assert r["limits"]["memory"] == r["requests"]["memory"] == "100Gi"  # one given quantity stands for both
    assert children.semantic_problems("gemma", spec(gpu={"profile": "dgx-spark"})) == []


def test_a_vllm_server_is_sized_for_vllm_and_the_workers_checks_do_not_apply_to_it() -> None:
    def memory(**overrides: Any) -> str:
        return str(pod(vllm_spec(**overrides))["containers"][0]["resources"]["requests"]["memory"])

    assert memory(gpu={"profile": "h100"}) == f"{profiles.HOST_MEMORY_GIB}Gi"
    # On unified memory vLLM takes --gpu-memory-utilization of the node for the GPU: 16 + 0.8 x 119.
    assert memory(gpu={"profile": "dgx-spark"}) == "112Gi"
    assert memory(gpu={"profile": "dgx-spark"}, vllm={"gpuMemoryUtilization": 0.5}) == "76Gi"
    # vLLM's own kernels decide what a dtype needs; the worker's maxActive does not size a vLLM pod.
    assert children.semantic_problems("gemma", vllm_spec(gpu={"profile": "h100", "dtype": "nvfp4"})) == []
    assert children.semantic_problems("gemma", vllm_spec(gpu={"profile": "dgx-spark", "dtype": "fp32"},
                                                         worker={"maxActive": 16})) == []
