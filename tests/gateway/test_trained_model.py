"""The bundled trained checkpoint behind the gateway: canvases stop before the step cap, and the gateway
learns it (the step share it predicts and reports moves to what the worker measured)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from dgemma_gateway.core import GatewaySettings
from dgemma_serve.workers import LocalWorkers
from dgemma_worker.checkpoints import BUNDLED_MODEL_DIR
from tests.gateway.gateway_harness import RunningGateway, static, variant

pytestmark = pytest.mark.timeout(300)

MODEL = "dgemma-tiny"
CAP = 48
PROMPTS = ("Say hello in one sentence.", "What is a list?", "Explain the import statement.")


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    local = LocalWorkers(str(BUNDLED_MODEL_DIR), 1, MODEL, workdir=tmp_path_factory.mktemp("trained"))
    with local.running() as workers:
        v = variant("trained", model=MODEL, canvas_length=32, max_denoising_steps=CAP)
        # A demand window longer than the module: what each test asked for is the difference of two snapshots.
        settings = GatewaySettings(watch_interval_s=0.2, demand_window_s=3600.0)
        gateway = RunningGateway([static(*((w.address, v) for w in workers.workers))], settings=settings)
        try:
            gateway.wait_ready(1)
            yield gateway
        finally:
            gateway.close()


def step_shares(gw: RunningGateway) -> dict[str, float]:
    """The gateway's learned step share per cap, as Prometheus reads it from /metrics."""
    text = gw.gateway.metrics.render().decode()
    families = [f for f in text_string_to_metric_families(text) if f.name == "dgemma_gateway_step_share"]
    return {s.labels["cap"]: s.value for f in families for s in f.samples if s.labels["variant"] == "trained"}


def test_replies_stop_before_the_cap_and_the_gateway_learns_the_share(gw: RunningGateway) -> None:
    assert step_shares(gw) == {}  # nothing finished yet: nothing learned
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0, timeout=120)
    measured = []
    for seed, prompt in enumerate(PROMPTS):
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                           max_tokens=64, seed=seed)
        extra = r.model_extra["dgemma"]  # type: ignore[index]
        text = r.choices[0].message.content or ""
        assert "\ufffd" not in text and re.search(r"[A-Za-z]{3,} [A-Za-z]{3,}", text), text
        measured.append(extra["decoder_passes"] / (extra["canvases"] * CAP))
    # Adaptive stopping: typical prompts take fewer decoder passes per canvas than the cap.
    assert sum(measured) / len(measured) < 0.75, measured
    assert sum(share < 1 for share in measured) >= 2, measured
    learned = step_shares(gw)[str(CAP)]
    assert min(measured) <= learned <= max(measured) and learned < 1


def test_the_response_says_what_the_prediction_was_made_of(gw: RunningGateway) -> None:
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0, timeout=120)
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello!"}],
                                       max_tokens=40, extra_body={"max_denoising_steps": 8})
    parts = r.model_extra["dgemma"]["prediction"]  # type: ignore[index]
    assert parts["canvases"] == 2 and 1 <= parts["steps_per_canvas"] <= 8 and parts["measured"] is True
    assert parts["step_ms"] > 0 and parts["queue_wait_ms"] >= 0


def canvases_asked(gw: RunningGateway) -> tuple[float, float]:
    """The variant's demand in the window, in canvases: (attributed, what the autoscaler scales on; routed)."""
    snap = gw.gateway.demand_snapshot()
    demand = snap.variants["trained"].demand
    return demand.canvases_per_s * snap.window_s, demand.routed_canvases_per_s * snap.window_s


def test_demand_counts_the_canvases_replies_are_expected_to_run_not_all_that_max_tokens_allows(
        gw: RunningGateway) -> None:
    # Capacity is in canvases really run; demand in canvases allowed would over-provision for replies that end
    # early (the model's replies end in their first canvas or two; max_tokens 96 allows three).
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0, timeout=120)
    prompts = [*PROMPTS, "Write about files.", "What does a module do?", "Describe a class."]

    def ask() -> int:
        """The prompts once; the canvases their replies ran."""
        ran = 0
        for seed, prompt in enumerate(prompts):
            r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                               max_tokens=96, seed=seed)
            ran += r.model_extra["dgemma"]["canvases"]  # type: ignore[index]
        return ran

    # The gateway learns reply lengths from the replies it has seen: first these prompts' replies (whatever
    # the tests before this one asked; alone, the first requests found nothing learned and counted all they
    # allowed), then the same prompts again are measured.
    ask()
    attributed_before, routed_before = canvases_asked(gw)
    ran = ask()
    allowed = 3 * len(prompts)
    attributed_after, routed_after = canvases_asked(gw)
    routed, attributed = routed_after - routed_before, attributed_after - attributed_before
    assert ran < allowed  # the premise: replies ended before max_tokens
    assert routed == pytest.approx(ran, rel=0.35), (routed, ran, allowed)
    assert attributed == pytest.approx(ran, rel=0.35), (attributed, ran, allowed)


def test_the_bundled_checkpoint_ships_its_training_record() -> None:
    record = Path(BUNDLED_MODEL_DIR, "training.json").read_text()
    assert '"train_seconds"' in record and '"heldout_diffusion"' in record
