"""Overflow routing and the runtimes' settings, as pure functions: an external API takes a request only when no
local endpoint is predicted to meet its target and every party allows it; overflowed demand is attributed
to the local variant the request preferred."""

from __future__ import annotations

from dataclasses import replace

import pytest

from dgemma_common.auth import parse_key_lines
from dgemma_gateway.attribution import Shape, attribute
from dgemma_gateway.core import Gateway
from dgemma_gateway.errors import GatewayError
from dgemma_gateway.openai_upstream import HttpTarget, request_body, retry_after_s
from dgemma_gateway.request import GatewayRequest
from dgemma_gateway.routing import load_profile_file, route_with_overflow
from dgemma_gateway.runtimes import has_images, refusal
from dgemma_gateway.types import Candidate, EndpointLoad, RouteRequest, Variant
from dgemma_proto.dgemma.v1 import denoiser_pb2 as pb

PIPELINE = load_profile_file("latency-target")
LOCAL = Variant("spark", "m", "dgx-spark", cost_weight=0.5, latency_target_ms=4000, canvas_length=256,
                tokens_per_s_prior=150.0, allow_overflow=True)
HOSTED = Variant("hosted", "m", "external", cost_weight=5.0, latency_target_ms=4000, canvas_length=256,
                 tokens_per_s_prior=1000.0, runtime="external")


def load(active: int = 0, step_s: float = 0.0) -> EndpointLoad:
    return EndpointLoad(queue_depth=0, active=active, capacity=4, max_queue=8, step_latency_s=step_s,
                        encoder_latency_s=step_s, tokens_per_s=0.0, canvas_length=256, model_name="m", ready=True,
                        draining=False, observed_at=0.0)


def candidates(local_load: EndpointLoad | None = None, local: Variant = LOCAL) -> list[Candidate]:
    out = [Candidate("hosted/1", HOSTED, replace(load(), max_queue=0))]
    if local_load is not None:
        out.append(Candidate("spark/1", local, local_load))
    return out


def pick(request: RouteRequest, cands: list[Candidate], variants: tuple[Variant, ...] = (LOCAL, HOSTED)) -> str:
    decision = route_with_overflow(PIPELINE, request, cands, 0.0, variants)
    return decision.endpoint.endpoint_id if decision.endpoint else "none"


def test_a_local_endpoint_that_meets_the_target_is_used_though_the_api_is_faster() -> None:
    # 256 tokens at the Spark's ~150 tokens/s prior: ~1.7 s, within 4 s.
    assert pick(RouteRequest("m", 256), candidates(load())) == "spark/1"


def test_a_request_no_local_endpoint_can_serve_in_time_overflows() -> None:
    assert pick(RouteRequest("m", 256, latency_target_ms=800), candidates(load())) == "hosted/1"
    busy = load(active=3, step_s=0.1)  # four requests of 49 passes at 0.1 s: far beyond any target
    assert pick(RouteRequest("m", 256), candidates(busy)) == "hosted/1"


def test_with_no_local_endpoint_at_all_the_request_overflows() -> None:
    assert pick(RouteRequest("m", 256), candidates(None)) == "hosted/1"
    # ... unless the model's local variant (scaled to zero, no endpoint) forbids it.
    closed = replace(LOCAL, allow_overflow=False)
    assert pick(RouteRequest("m", 256), candidates(None), (closed, HOSTED)) == "none"


def test_a_variant_or_a_caller_that_forbids_overflow_keeps_the_request_local() -> None:
    closed = replace(LOCAL, allow_overflow=False)
    assert pick(RouteRequest("m", 256, latency_target_ms=800), candidates(load(), closed), (closed, HOSTED)) \
        == "spark/1"
    forbidden = RouteRequest("m", 256, latency_target_ms=800, allow_overflow=False)
    assert pick(forbidden, candidates(load())) == "spark/1"


def test_overflow_that_would_be_slower_than_the_local_miss_stays_local() -> None:
    slow_api = [replace(c, load=load(step_s=1.0)) if c.variant.overflow else c for c in candidates(load())]
    assert pick(RouteRequest("m", 256, latency_target_ms=800), slow_api) == "spark/1"


def test_overflowed_demand_is_attributed_to_the_local_variant_it_preferred() -> None:
    shape = Shape("m", 256, None, None)
    preferred, _ = attribute([("hosted", shape, 256, 1)], [LOCAL, HOSTED], [], 0.0, 60.0)
    assert preferred["spark"].requests == pytest.approx(1 / 60) and preferred["hosted"].requests == 0


def test_each_runtime_refuses_what_it_cannot_honour_by_name() -> None:
    knobs = {"max_new_tokens": 64, "stop": ["x"], "max_denoising_steps": 8, "stream_drafts": True}
    assert refusal("dgemma", knobs) is None
    name, why = refusal("vllm", knobs) or ("", "")
    assert name == "max_denoising_steps" and "--diffusion-config" in why and "0.24.0" in why
    assert refusal("vllm", {"max_new_tokens": 8, "ignore_eos": True, "draft_interval_s": 0.1}) is None
    assert refusal("vllm", {"max_new_tokens": 8, "seed": 1}) is not None
    assert refusal("external", {"max_new_tokens": 8, "seed": 1, "stop": "x"}) is None
    assert (refusal("external", {"max_new_tokens": 8, "ignore_eos": True}) or ("",))[0] == "ignore_eos"


def test_a_forwarded_request_is_built_from_the_validated_request_not_the_raw_body() -> None:
    chat = pb.Prompt(chat=pb.ChatMessages(messages=[pb.ChatMessage(role="system", content="be brief"),
                                                    pb.ChatMessage(role="user", content="hi")]))
    req = GatewayRequest("m", chat, {"max_new_tokens": 32, "stop": ["\n"], "ignore_eos": True, "stream_drafts": True})
    path, body = request_body(req, HttpTarget("http://x/v1", "google/dg"), replace(LOCAL, runtime="vllm"))
    assert path == "/chat/completions"
    assert body == {"model": "google/dg", "stream": True, "stream_options": {"include_usage": True},
                    "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
                    "max_tokens": 32, "stop": ["\n"], "ignore_eos": True}
    tokens = GatewayRequest("m", pb.Prompt(tokens=pb.TokenIds(ids=[1, 2])), {"max_new_tokens": 4, "seed": 7})
    path, body = request_body(tokens, HttpTarget("http://x/v1", "gpt"), HOSTED)
    assert (path, body["prompt"], body["seed"], body["max_tokens"]) == ("/completions", [1, 2], 7, 4)


def test_retry_after_is_read_as_seconds_or_a_date_and_bounded() -> None:
    assert retry_after_s("7") == 7.0
    assert retry_after_s("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == pytest.approx(10.0)
    assert retry_after_s("-3") == 0.0 and retry_after_s("1e9") == 3600.0
    assert retry_after_s("soon") is None and retry_after_s(None) is None and retry_after_s("nan") is None


def test_a_keys_file_line_may_forbid_overflow_for_its_key() -> None:
    assert parse_key_lines("a\nb no-overflow\n# c no-overflow\nd e f\n") == [
        ("a", frozenset()), ("b", frozenset({"no-overflow"})), ("d e f", frozenset())]


def test_a_prompt_with_images_goes_only_to_dgemma_workers() -> None:
    image = pb.Prompt(chat=pb.ChatMessages(messages=[pb.ChatMessage(role="user", parts=[
        pb.ContentPart(image=pb.Image(data=b"png")), pb.ContentPart(text="what is it?")])]))
    assert has_images(image) and has_images(pb.Prompt(text="hi", images=[pb.Image(data=b"png")]))
    assert not has_images(pb.Prompt(chat=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="hi")])))
    req = GatewayRequest(model="m", prompt=image, settings={"max_new_tokens": 8}, param_names={"prompt": "messages"})
    assert Gateway._takes("dgemma", req)
    assert not Gateway._takes("external", req) and not Gateway._takes("vllm", req)  # they are forwarded text only
    assert Gateway._takes("external", replace(req, prompt=pb.Prompt(text="hi")))
    gateway = Gateway(PIPELINE, [])
    gateway.registry.variants = {"hosted": HOSTED}
    with pytest.raises(GatewayError) as info:
        gateway._check_settings(req)
    assert (info.value.status, info.value.param) == (400, "messages")
    gateway.registry.variants = {"hosted": HOSTED, "spark": LOCAL}
    gateway._check_settings(req)
