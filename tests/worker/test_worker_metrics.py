"""The Prometheus endpoint, scraped over HTTP and parsed with prometheus_client's parser."""

from __future__ import annotations

import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dgemma_proto.dgemma.v1 import denoiser_pb2 as pb

from .conftest import RunningWorker, text_request

pytestmark = pytest.mark.timeout(60)


def _scrape(w: RunningWorker) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    url = f"http://127.0.0.1:{w.server.metrics_port}/metrics"
    body = urllib.request.urlopen(url, timeout=5).read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }


def test_metrics_count_requests_tokens_steps_and_expose_load(worker: RunningWorker) -> None:
    before = _scrape(worker)
    params = pb.GenerationParams(max_new_tokens=20, max_denoising_steps=3, ignore_eos=True)
    list(worker.stub.Generate(text_request(params=params)))
    with pytest.raises(Exception):  # noqa: B017 - any RpcError: the point is the refusal is counted
        list(worker.stub.Generate(text_request(params=pb.GenerationParams(max_new_tokens=0))))
    after = _scrape(worker)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("dgemma_worker_requests_total", outcome="length") == 1
    assert delta("dgemma_worker_requests_total", outcome="invalid") == 1
    assert delta("dgemma_worker_tokens_generated_total") == 20
    assert delta("dgemma_worker_decoder_passes_total") == 6  # two canvases, three steps each
    assert delta("dgemma_worker_step_latency_seconds_count", kind="decoder") == 6
    assert delta("dgemma_worker_time_to_first_commit_seconds_count") == 1
    assert after[("dgemma_worker_ready", ())] == 1
    assert after[("dgemma_worker_capacity", ())] == 2
    assert ("dgemma_worker_queue_depth", ()) in after and ("dgemma_worker_active_requests", ()) in after
    assert after[("dgemma_worker_model_info", (("model", "tiny"), ("revision", "local")))] == 1


def test_busy_time_holds_every_step_and_the_load_report_charges_it_per_step(worker: RunningWorker) -> None:
    """The engine's busy time contains every timed step and encoder pass and the work between them; the
    load report's busy time per step (what the gateway's capacity charges) is the gauge Prometheus reads."""
    before = _scrape(worker)
    params = pb.GenerationParams(max_new_tokens=40, max_denoising_steps=4, ignore_eos=True)
    list(worker.stub.Generate(text_request(params=params)))
    after = _scrape(worker)
    report = worker.stub.GetLoad(pb.GetLoadRequest())

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    timed = (delta("dgemma_worker_step_latency_seconds_sum", kind="decoder")
             + delta("dgemma_worker_step_latency_seconds_sum", kind="encoder"))
    assert delta("dgemma_worker_busy_seconds_total") > timed > 0
    assert report.busy_step_s == after[("dgemma_worker_busy_step_seconds", ())] > 0
