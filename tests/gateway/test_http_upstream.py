"""A gateway in front of OpenAI-compatible HTTP upstreams, with real servers and real clients: `dgemma serve`
processes, and the same OpenAI server in-process over the test workers, standing in for vLLM pods (nothing can
run vLLM itself on these machines).

Streams pass through chunk by chunk with usage, errors keep the gateway's shapes, settings vLLM fixes per
server are refused by name, a 429 is passed on and pauses the upstream, a slow upstream loses traffic or
its deadline, a client that leaves cancels the upstream request, an upstream that dies mid-stream ends the
stream with an error, and an external API takes only what the local endpoints cannot serve in time. A vLLM
endpoint gets the workers' key (--worker-api-key-file) as a bearer token; `dgemma serve`'s own workers refuse a
direct call without the key of its run."""

from __future__ import annotations

import json
import queue
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import openai
import pytest
import tritonclient.grpc as tc

from dgemma_gateway.config import overflow_spec, parse_config, parse_endpoint
from dgemma_gateway.endpoints import EndpointSpec, StaticSource
from dgemma_gateway.openai_api import ApiLimits
from dgemma_proto.dgemma.v1 import denoiser_pb2 as pb
from dgemma_proto.dgemma.v1 import denoiser_pb2_grpc as pb_grpc
from dgemma_worker.model import tiny_model_dir
from tests.gateway.gateway_harness import MODEL, Pool, RunningGateway, static, variant
from tests.stack import DgemmaProcess

pytestmark = pytest.mark.timeout(240)

SERVED = "tiny-diffusiongemma"  # the name the tests' `dgemma serve` gives the random-weight tiny model


def serve_tiny(*args: str) -> list[str]:
    """`dgemma serve` on the random-weight tiny model (canvas 16), not the bundled trained default."""
    return ["serve", "--model", str(tiny_model_dir()), "--served-model-name", SERVED, *args]


def http(url: str, name: str = "vllm", model: str = MODEL, **variant_kw: Any) -> StaticSource:
    """A gateway source with one OpenAI-compatible endpoint (a vLLM variant unless told otherwise)."""
    spec = parse_endpoint(f"{url}/v1={name}:{model}")
    return StaticSource([replace_variant(spec, canvas_length=16, **variant_kw)], name=f"http-{name}")


def replace_variant(spec: EndpointSpec, **kw: Any) -> EndpointSpec:
    return replace(spec, variant=replace(spec.variant, **kw))


def upstream_of(address: str, limits: ApiLimits | None = None) -> RunningGateway:
    """An in-process gateway over one test worker: the OpenAI server `dgemma serve` runs, ready to serve."""
    g = RunningGateway([static((address, variant("up")))], limits=limits)
    g.wait_ready(1)
    return g


def client(g: RunningGateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{g.url}/v1", api_key="x", max_retries=0, timeout=120)


def until(check: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def serve() -> Iterator[str]:
    """`dgemma serve` on the random-weight tiny model: the upstream URL (its OpenAI API is under /v1)."""
    p = DgemmaProcess(serve_tiny("--port", "0", "--grpc-port", "-1", "--max-active", "2"))
    try:
        yield p.serving(180)
    finally:
        p.kill()


@pytest.fixture(scope="module")
def chain(serve: str) -> Iterator[RunningGateway]:
    """A gateway (with its KServe front) whose only endpoint is `dgemma serve`, as a vLLM variant."""
    g = RunningGateway([http(serve, model=SERVED)], grpc=True)
    try:
        g.wait_ready(1, timeout=30)
        yield g
    finally:
        g.close()


def test_a_stream_from_dgemma_serve_passes_through_chunk_by_chunk_with_usage(chain: RunningGateway) -> None:
    raw = client(chain).chat.completions.with_raw_response.create(
        model=SERVED, messages=[{"role": "user", "content": "Hello"}], max_tokens=40, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    assert raw.headers["x-dgemma-variant"] == "vllm"
    chunks = list(raw.parse())
    contents = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(contents) == 3  # the tiny model's canvas is 16 tokens: 16 + 16 + 8, one chunk each upstream
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 40 and usage.prompt_tokens > 0
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    text = client(chain).completions.create(model=SERVED, prompt="Once", max_tokens=8, extra_body={"ignore_eos": True})
    assert text.usage is not None and text.usage.completion_tokens == 8 and text.choices[0].text


def test_tritonclient_streams_from_dgemma_serve_through_the_gateway(chain: RunningGateway) -> None:
    results: queue.Queue[Any] = queue.Queue()
    triton = tc.InferenceServerClient(chain.grpc_address)
    assert triton.is_model_ready(SERVED)
    prompt = tc.InferInput("text_input", [1], "BYTES")
    prompt.set_data_from_numpy(np.array([b"Hi"], dtype=object))
    params = tc.InferInput("sampling_parameters", [1], "BYTES")
    params.set_data_from_numpy(np.array([json.dumps({"max_tokens": 40, "ignore_eos": True}).encode()], dtype=object))
    triton.start_stream(callback=lambda result, error: results.put((result, error)))
    triton.async_stream_infer(SERVED, [prompt, params], request_id="r1")
    texts = []
    while True:
        result, error = results.get(timeout=120)
        assert error is None, error
        if result.get_response().parameters["triton_final_response"].bool_param:
            assert result.as_numpy("stop_reason")[0] == b"length"
            break
        texts.append(result.as_numpy("text_output")[0])
    triton.stop_stream()
    triton.close()
    assert len(texts) == 3 and all(texts)


def test_settings_vllm_fixes_per_server_are_refused_by_name_or_routed_to_a_worker(
        chain: RunningGateway, pool: Pool, serve: str) -> None:
    for field, value in (("max_denoising_steps", 4), ("seed", 3), ("t_min", 0.1)):
        with pytest.raises(openai.BadRequestError) as err:
            client(chain).chat.completions.create(model=SERVED, messages=[{"role": "user", "content": "x"}],
                                                  max_tokens=4, extra_body={field: value})
        body: Any = err.value.body
        assert body["param"] == field and "vLLM 0.24.0" in body["message"], body
    # Beside a dgemma worker, the request goes where it can be honoured.
    mixed = RunningGateway([http(serve, model=MODEL), static((pool.fast[1].address, variant("worker", cost_weight=9)))])
    try:
        mixed.wait_ready(2)
        raw = client(mixed).chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=4,
            extra_body={"max_denoising_steps": 2})
        assert raw.headers["x-dgemma-variant"] == "worker"
    finally:
        mixed.close()


def test_an_upstream_400_keeps_the_clients_field_name(pool: Pool) -> None:
    upstream = upstream_of(pool.fast[0].address, ApiLimits(max_tokens=32))
    front = RunningGateway([http(upstream.url)])
    try:
        front.wait_ready(1, timeout=30)
        with pytest.raises(openai.BadRequestError) as err:
            client(front).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                                  max_completion_tokens=64)
        body: Any = err.value.body
        assert body["param"] == "max_completion_tokens" and "upstream" in body["message"]
        assert front.gateway.registry.endpoints[f"vllm/{upstream.url}/v1"].failures == 0  # not the upstream's fault
    finally:
        front.close()
        upstream.close()


def test_an_upstream_429_is_passed_on_with_retry_after_and_pauses_it(pool: Pool) -> None:
    upstream = upstream_of(pool.fast[0].address, ApiLimits(max_streams_per_key=1))
    front = RunningGateway([http(upstream.url)])
    c = client(front)
    try:
        front.wait_ready(1, timeout=30)
        first = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=1024,
                                          stream=True, extra_body={"ignore_eos": True})
        next(iter(first))  # holds the upstream's only stream
        with pytest.raises(openai.RateLimitError) as err:
            c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=4)
        assert int(err.value.response.headers["Retry-After"]) >= 1
        # Paused for its Retry-After: the next request is refused here, without asking the upstream again.
        with pytest.raises(openai.RateLimitError) as again:
            c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=4)
        assert "pause" in str(again.value)
        metrics = front.gateway.metrics.render().decode()
        assert 'dgemma_gateway_upstream_throttled_total{variant="vllm"} 1.0' in metrics
        first.close()
        until(lambda: not upstream.server.api.streams.active, 30, "the upstream to free its stream")
        time.sleep(1.1)  # the Retry-After
        reply = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=4)
        assert reply.choices[0].finish_reason in ("stop", "length")
        assert front.gateway.registry.endpoints[f"vllm/{upstream.url}/v1"].failures == 0  # busy, not broken
    finally:
        front.close()
        upstream.close()


def test_a_client_that_goes_away_cancels_the_upstream_request(pool: Pool) -> None:
    upstream = upstream_of(pool.fast[1].address)
    front = RunningGateway([http(upstream.url)])
    try:
        front.wait_ready(1, timeout=30)
        stream = client(front).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=4096, stream=True,
            extra_body={"ignore_eos": True})
        next(iter(stream))
        assert upstream.server.api.streams.active
        stream.close()
        # 4096 tokens take minutes on this CPU: an empty upstream means the request was cancelled there.
        until(lambda: not upstream.server.api.streams.active, 15, "the upstream request to be cancelled")
        until(lambda: all(s.load and s.load.active == 0 for s in upstream.gateway.registry.endpoints.values()),
              15, "the worker to drop the request")
    finally:
        front.close()
        upstream.close()


def test_a_slow_upstream_loses_the_traffic_and_misses_a_short_deadline(pool: Pool) -> None:
    fast = upstream_of(pool.fast[0].address)
    slow = upstream_of(pool.slow.address)
    front = RunningGateway([http(fast.url, "fast"), http(slow.url, "slow")])
    c = client(front)
    try:
        front.wait_ready(2, timeout=30)
        def one() -> str:
            raw = c.chat.completions.with_raw_response.create(
                model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=8)
            return str(raw.headers["x-dgemma-variant"])

        # Unmeasured, each is predicted from the prior, so both get tried; once measured, the slow one's
        # canvases take far longer and the traffic stays on the fast one.
        served = [one() for _ in range(2)]
        while "slow" not in served:
            served.append(one())
            assert len(served) < 5, served
        assert [one(), one()] == ["fast", "fast"], served
        # 24 canvases of the tiny model's default 8 steps (its generation_config): far more than 0.5 s anywhere.
        with pytest.raises(openai.APIStatusError) as err:
            c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=384,
                                      extra_body={"timeout_s": 0.5, "ignore_eos": True})
        assert err.value.status_code == 504
    finally:
        front.close()
        fast.close()
        slow.close()


def test_a_dgemma_serve_that_dies_mid_stream_ends_the_stream_with_an_error_and_is_ejected() -> None:
    upstream = DgemmaProcess(serve_tiny("--port", "0", "--grpc-port", "-1"))
    front = None
    try:
        url = upstream.serving(180)
        front = RunningGateway([http(url, model=SERVED)])
        front.wait_ready(1, timeout=30)
        stream = client(front).chat.completions.create(
            model=SERVED, messages=[{"role": "user", "content": "x"}], max_tokens=256, stream=True,
            extra_body={"ignore_eos": True})
        chunks = iter(stream)
        while not (next(chunks).choices[0].delta.content or ""):
            pass  # the role chunk, then the first canvas
        upstream.kill()  # the gateway process and its worker, at once
        with pytest.raises(openai.APIError, match="connection broke mid-stream"):
            for _ in chunks:
                pass
        with pytest.raises(openai.APIStatusError) as err:
            client(front).chat.completions.create(model=SERVED, messages=[{"role": "user", "content": "x"}])
        assert err.value.status_code == 503
    finally:
        if front is not None:
            front.close()
        upstream.kill()


def test_a_request_fails_over_from_a_dead_upstream_before_its_first_byte(pool: Pool) -> None:
    live = upstream_of(pool.fast[0].address)
    # Nothing listens on port 9. An upstream without metrics (routed on its measured latencies) counts as ready
    # until a request there fails; a vLLM one would be unready from its first failed scrape.
    dead = http("http://127.0.0.1:9", "dead", cost_weight=0.1)
    dead.endpoints = [replace(e, http=replace(e.http, scrape=False)) for e in dead.endpoints if e.http]
    front = RunningGateway([dead, http(live.url, "live")])
    try:
        front.wait_ready(2, timeout=30)
        raw = client(front).chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=4)
        assert raw.headers["x-dgemma-variant"] == "live"
        assert front.gateway.registry.endpoints["dead/http://127.0.0.1:9/v1"].failures == 1
        assert 'dgemma_gateway_retries_total{reason="connection"} 1.0' in front.gateway.metrics.render().decode()
    finally:
        front.close()
        live.close()


def test_dgemma_serve_takes_the_overflow_only_when_the_local_worker_cannot_meet_the_target(
        pool: Pool, serve: str, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("open-key\nclosed-key no-overflow\n")

    # The slow worker (SLOW_STEP_S a step) is predicted slower than the overflow's prior (0.26 s) whatever this
    # machine's speed; a fast one's 48 steps were predicted at 0.15-0.37 s, on either side of it.
    def front_with(allow: bool) -> RunningGateway:
        # Also at the tiny model's own 8 steps per canvas, which the gateway learns after the first reply.
        local = static((pool.slow.address, variant("local", allow_overflow=allow)))
        hosted = overflow_spec(f"{serve}/v1", SERVED, MODEL, max_concurrency=4)
        return RunningGateway([local, StaticSource([hosted], name="overflow")], keys=keys)

    def served_by(g: RunningGateway, target_ms: int, key: str = "open-key") -> str:
        c = openai.OpenAI(base_url=f"{g.url}/v1", api_key=key, max_retries=0, timeout=120)
        raw = c.chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=8,
            extra_headers={"x-dgemma-latency-target-ms": str(target_ms)})
        return str(raw.headers["x-dgemma-variant"])

    open_ = front_with(True)
    try:
        open_.wait_ready(2)
        assert served_by(open_, 120_000) == "local"  # the worker meets a loose target (8 steps: ~0.7 s)
        assert served_by(open_, 300) == "overflow"  # not a tight one
        assert served_by(open_, 300, key="closed-key") == "local"  # ... unless the caller's key forbids it
        # The overflowed request is demand for the local variant it preferred.
        local = open_.gateway.demand_snapshot().variants["local"].demand
        assert local.preferred_requests_per_s > local.routed_requests_per_s
    finally:
        open_.close()
    closed = front_with(False)
    try:
        closed.wait_ready(2)
        assert served_by(closed, 300) == "local"  # the variant forbids it: data stays in the cluster
    finally:
        closed.close()


def test_dgemma_serve_with_overflow_serves_at_once_while_its_first_worker_starts(serve: str) -> None:
    p = DgemmaProcess(serve_tiny("--port", "0", "--grpc-port", "-1", "--replicas", "0", "--autoscale",
                                 "--min-replicas", "0", "--max-replicas", "1", "--autoscale-interval-s", "0.5",
                                 "--demand-window-s", "5", "--overflow-url", f"{serve}/v1", "--overflow-model", SERVED))
    try:
        url = p.serving(120)
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=120)
        raw = c.chat.completions.with_raw_response.create(
            model=SERVED, messages=[{"role": "user", "content": "x"}], max_tokens=8)
        assert raw.headers["x-dgemma-variant"] == "overflow"  # no local worker yet: not held, sent out
        # ... and counted as the local variant's demand, so its first worker starts.
        p.wait_for(r"0 -> 1 workers", 60)
    finally:
        p.kill()


def test_a_vllm_endpoint_gets_the_workers_key_as_a_bearer_token(pool: Pool, tmp_path: Path) -> None:
    key = tmp_path / "worker-key"
    key.write_text("wk-vllm-0123456789\n")
    # Stands in for a vLLM pod started with VLLM_API_KEY: /v1 needs the key, /health and /metrics stay open.
    upstream = RunningGateway([static((pool.fast[0].address, variant("up")))], keys=key)

    def front(*flags: str) -> RunningGateway:
        config = parse_config(["--endpoint", f"{upstream.url}/v1=vllm:{MODEL}", *flags], env={})
        return RunningGateway([StaticSource(config.endpoints)])

    keyed, keyless = front("--worker-api-key-file", str(key)), front()
    try:
        upstream.wait_ready(1)
        keyed.wait_ready(1, timeout=30)
        reply = client(keyed).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                                      max_tokens=4)
        assert reply.usage is not None and reply.usage.completion_tokens > 0
        keyless.wait_ready(1, timeout=30)
        with pytest.raises(openai.APIStatusError) as err:
            client(keyless).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                                    max_tokens=4)
        assert err.value.status_code == 502 and err.value.code == "upstream_misconfigured"
    finally:
        keyless.close()
        keyed.close()
        upstream.close()


def test_dgemma_serve_workers_refuse_a_direct_call_without_the_key_of_its_run(serve: str) -> None:
    raw = openai.OpenAI(base_url=f"{serve}/v1", api_key="x", max_retries=0, timeout=120).chat.completions \
        .with_raw_response.create(model=SERVED, messages=[{"role": "user", "content": "x"}], max_tokens=4)
    worker = raw.headers["x-dgemma-endpoint"].split("/", 1)[1]  # the gateway's way in: local/127.0.0.1:PORT
    assert worker.startswith("127.0.0.1:")
    with grpc.insecure_channel(worker) as channel:
        stub = pb_grpc.DenoiserStub(channel)
        for call in (lambda: stub.GetLoad(pb.GetLoadRequest(), timeout=30),
                     lambda: list(stub.Generate(pb.GenerateRequest(prompt=pb.Prompt(text="x")), timeout=30))):
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
