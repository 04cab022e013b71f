"""The operator's autoscaler against the emulator: kopf's KopfRunner, a fixed demand answer for the gateway."""

from __future__ import annotations

import json
import time

from kopf.testing import KopfRunner

from dgemma_common.demand import VERSION
from tests.autoscaler.views import snapshot
from tests.k8s_emulator import EmulatorThread
from tests.operator.helpers import DemandStub, apply, eventually, get, mark_ready, sample

FAST = {"enabled": True, "targetUtilization": 0.5, "scaleUpStabilizationSeconds": 0, "scaleDownStabilizationSeconds": 2}


def decision(k8s: EmulatorThread, name: str = "gemma") -> dict[str, object]:
    """The last decision recorded in the status (empty before the first)."""
    return dict(((get(k8s, "dgm", name).get("status") or {}).get("autoscaling") or {}).get("lastDecision") or {})


def events(k8s: EmulatorThread, name: str = "gemma") -> list[tuple[str, str]]:
    items = json.loads(k8s.kubectl("get", "events", "-o", "json").stdout)["items"]
    return [(e["reason"], e.get("message", "")) for e in items if e["involvedObject"]["name"] == name]


def reasons(k8s: EmulatorThread, name: str = "gemma") -> list[str]:
    return [reason for reason, _ in events(k8s, name)]


def scaled_up(k8s: EmulatorThread) -> str | None:
    return next((message for reason, message in events(k8s) if reason == "ScaledUp"), None)


def test_demand_scales_the_resource_through_its_scale_subresource_up_and_back_down(
    k8s: EmulatorThread, operator: KopfRunner, demand: DemandStub
) -> None:
    demand.demand("default/gemma", canvases_per_s=1.6, capacity=1.0)  # 1.6 / (1.0 x 0.5) -> 4 replicas
    apply(k8s, sample(replicas=1, maxReplicas=3, autoscaling=FAST))
    eventually(lambda: get(k8s, "deployment", "gemma-worker")["spec"]["replicas"] == 3, timeout=20)
    # The scale-up decision as it was made: its event (the next tick, a moment later, overwrites
    # lastDecision with "steady", so the status alone may no longer show it).
    message = eventually(lambda: scaled_up(k8s), timeout=10)
    assert message.startswith("1 -> 3 replicas: ") and "bounded to [1, 3]" in message, message
    assert "(demand 1.6 canvases/s" in message, message
    d = decision(k8s)  # the latest decision: it keeps the 3 replicas for the demand it saw
    assert d["desiredReplicas"] == 3 and d["inputs"]["demand_canvases_per_s"] == 1.6  # type: ignore[index]
    assert get(k8s, "dgm", "gemma")["status"]["autoscaling"]["memory"]["recommendations"]
    scale_calls = [r for r in k8s.handler if r.subresource == "scale" and r.method.value == "PATCH"]
    assert scale_calls, "replicas are set through the scale subresource"
    mark_ready(k8s, "gemma-worker", 3)

    demand.demand("default/gemma", canvases_per_s=0.4, capacity=1.0)  # 0.4 / 0.5 -> 1 replica, one step at a time
    eventually(lambda: get(k8s, "dgm", "gemma")["spec"]["replicas"] == 1, timeout=30)
    eventually(lambda: "ScaledDown" in reasons(k8s), timeout=10)  # the event is posted after the scale


def test_without_measurements_the_replicas_stay_and_the_reason_is_recorded(
    k8s: EmulatorThread, operator: KopfRunner, demand: DemandStub
) -> None:
    apply(k8s, sample(replicas=2, autoscaling=FAST))  # the gateway does not know the variant
    eventually(lambda: "does not know variant 'default/gemma'" in str(decision(k8s).get("reason")), timeout=20)
    assert decision(k8s)["desiredReplicas"] == 2 and get(k8s, "dgm", "gemma")["spec"]["replicas"] == 2
    assert "NoMeasurements" in reasons(k8s)


def test_with_autoscaling_off_the_replicas_are_never_touched(
    k8s: EmulatorThread, operator: KopfRunner, demand: DemandStub
) -> None:
    demand.demand("default/gemma", canvases_per_s=10.0)
    apply(k8s, sample(replicas=1, autoscaling={"enabled": False}))
    eventually(lambda: get(k8s, "deployment", "gemma-worker")["spec"]["replicas"] == 1)
    k8s.kubectl("scale", "dgm/gemma", "--replicas=2")  # a human (or HPA/KEDA) is in charge
    time.sleep(2.0)  # four autoscaler intervals
    assert get(k8s, "dgm", "gemma")["spec"]["replicas"] == 2
    assert demand.requests == 0 and "autoscaling" not in (get(k8s, "dgm", "gemma").get("status") or {})


def test_a_restarted_operator_carries_on_from_the_state_in_the_status(
    k8s: EmulatorThread, crd: None, demand: DemandStub
) -> None:
    from tests.operator.conftest import OPERATOR_ARGS

    demand.demand("default/gemma", canvases_per_s=1.0, capacity=1.0)
    slow_down = {**FAST, "scaleDownStabilizationSeconds": 3600}
    apply(k8s, sample(replicas=1, maxReplicas=3, autoscaling=slow_down))
    with KopfRunner(OPERATOR_ARGS, timeout=30):
        eventually(lambda: get(k8s, "dgm", "gemma")["spec"]["replicas"] == 2, timeout=20)
    remembered = get(k8s, "dgm", "gemma")["status"]["autoscaling"]["memory"]
    demand.demand("default/gemma", canvases_per_s=0.0, capacity=1.0)
    with KopfRunner(OPERATOR_ARGS, timeout=30):
        eventually(lambda: get(k8s, "dgm", "gemma")["status"]["autoscaling"]["memory"] != remembered, timeout=20)
        time.sleep(1.0)
    memory = get(k8s, "dgm", "gemma")["status"]["autoscaling"]["memory"]
    assert memory["firstSeen"] == remembered["firstSeen"]  # the window goes on where it was
    assert get(k8s, "dgm", "gemma")["spec"]["replicas"] == 2  # no scale-down inside the hour-long window


def conditions(k8s: EmulatorThread, name: str = "gemma") -> dict[str, dict[str, str]]:
    return {c["type"]: c for c in (get(k8s, "dgm", name).get("status") or {}).get("conditions") or []}


def test_a_snapshot_with_a_renamed_key_is_an_error_on_the_resource_not_a_zero_that_scales_down(
    k8s: EmulatorThread, operator: KopfRunner, demand: DemandStub
) -> None:
    """The gateway renames `canvases_per_s` (a newer or broken build): the operator must not read the missing
    number as zero demand and scale three replicas down; it keeps them and says why on the resource."""
    demand.demand("default/gemma", canvases_per_s=1.0, capacity=1.0)
    apply(k8s, sample(replicas=3, maxReplicas=3, autoscaling={**FAST, "scaleDownStabilizationSeconds": 0}))
    eventually(lambda: get(k8s, "deployment", "gemma-worker"), timeout=20)  # the operator creates it first
    mark_ready(k8s, "gemma-worker", 3)
    eventually(lambda: conditions(k8s).get("ScalingActive", {}).get("status") == "True", timeout=20)
    assert conditions(k8s)["Ready"]["status"] == "True"  # the reconciler's conditions are kept beside it

    answer = snapshot(demand.variants).model_dump(mode="json")
    renamed = answer["variants"]["default/gemma"]["demand"]
    renamed["canvas_per_s"] = renamed.pop("canvases_per_s")
    demand.answer = answer
    eventually(lambda: conditions(k8s)["ScalingActive"]["status"] == "False", timeout=20)
    active = conditions(k8s)["ScalingActive"]
    assert active["reason"] == "InvalidDemandSnapshot"
    assert "variants.default/gemma.demand.canvases_per_s: field required" in active["message"]
    time.sleep(2.0)  # four autoscaler intervals with zero stabilization: a zero would have scaled down by now
    assert get(k8s, "dgm", "gemma")["spec"]["replicas"] == 3
    assert "kept 3 replicas" in str(decision(k8s).get("reason"))
    assert conditions(k8s)["Ready"]["status"] == "True"

    # A gateway of an earlier or a later contract (a rolling upgrade): the operator keeps the replicas.
    for other in (VERSION - 1, VERSION + 1):
        demand.answer = {**snapshot(demand.variants).model_dump(mode="json"), "version": other}
        eventually(lambda v=other: f"has version {v}" in conditions(k8s)["ScalingActive"]["message"], timeout=20)
        assert get(k8s, "dgm", "gemma")["spec"]["replicas"] == 3

    demand.answer = None  # the gateway speaks the operator's version again: measurements are valid, scaling resumes
    eventually(lambda: conditions(k8s)["ScalingActive"]["status"] == "True", timeout=20)
