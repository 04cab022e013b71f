"""dgemma.v1.Denoiser over a real channel: streaming, cancellation, deadlines, errors, concurrency."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
import torch

from dgemma_proto.dgemma.v1 import denoiser_pb2 as pb
from dgemma_proto.dgemma.v1 import denoiser_pb2_grpc as pb_grpc

from .conftest import LONG, RunningWorker, text_request, wait_until

pytestmark = pytest.mark.timeout(120)


def _code(call: object) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        list(call)  # type: ignore[call-overload]
    err = info.value
    return err.code(), err.details()  # type: ignore[attr-defined]


def test_generate_streams_one_commit_per_canvas_then_a_final_with_stats(worker: RunningWorker) -> None:
    params = pb.GenerationParams(max_new_tokens=40, max_denoising_steps=4, seed=7)
    responses = list(worker.stub.Generate(text_request("Hello", params, request_id="r-1")))
    commits = [r.commit for r in responses if r.HasField("commit")]
    final = responses[-1]
    assert all(r.request_id == "r-1" for r in responses)
    assert [c.canvas_index for c in commits] == [0, 1, 2]  # canvas 16: 16 + 16 + 8 tokens
    assert sum(len(c.token_ids) for c in commits) == 40
    assert final.HasField("final") and final.final.stop_reason == pb.STOP_REASON_LENGTH
    stats = final.final.stats
    assert stats.completion_tokens == 40 and stats.canvases == 3 and stats.decoder_passes == 12
    assert stats.HasField("time_to_first_commit_s") and stats.total_s > 0


def test_same_seed_gives_same_reply_and_drafts_come_when_asked(worker: RunningWorker) -> None:
    params = pb.GenerationParams(max_new_tokens=16, max_denoising_steps=3, seed=3, stream_drafts=True)
    a = list(worker.stub.Generate(text_request("Why", params)))
    b = list(worker.stub.Generate(text_request("Why", params)))
    assert [r.commit.text for r in a if r.HasField("commit")] == [r.commit.text for r in b if r.HasField("commit")]
    assert sum(r.HasField("draft") for r in a) >= 1
    quiet = pb.GenerationParams(max_new_tokens=8, max_denoising_steps=2)
    assert not any(r.HasField("draft") for r in worker.stub.Generate(text_request("Why", quiet)))


def test_chat_and_token_prompts_are_accepted(worker: RunningWorker) -> None:
    chat = pb.Prompt(chat=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="Hi")]))
    ids = worker.stub.Tokenize(pb.TokenizeRequest(prompt=chat)).token_ids
    assert len(ids) > 3
    params = pb.GenerationParams(max_new_tokens=8, max_denoising_steps=2)
    for prompt in (chat, pb.Prompt(tokens=pb.TokenIds(ids=ids))):
        final = list(worker.stub.Generate(pb.GenerateRequest(prompt=prompt, params=params)))[-1].final
        assert final.stats.prompt_tokens == len(ids)
    text = worker.stub.Detokenize(pb.DetokenizeRequest(token_ids=worker.stub.Tokenize(
        pb.TokenizeRequest(prompt=pb.Prompt(text="Hello, world!"))).token_ids)).text
    assert text == "Hello, world!"


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (text_request(params=pb.GenerationParams(max_new_tokens=0)), "max_new_tokens"),
        (text_request(params=pb.GenerationParams(t_min=0.9, t_max=0.5)), "t_max"),
        (text_request(params=pb.GenerationParams(max_denoising_steps=100000)), "max_denoising_steps"),
        (pb.GenerateRequest(), "prompt"),
        (text_request(""), "prompt.text"),
        (pb.GenerateRequest(prompt=pb.Prompt(tokens=pb.TokenIds(ids=[10**9]))), "prompt.token_ids"),
        (text_request("word " * 2000), "prompt"),  # over the 512-token limit
        (text_request(timeout_s=-1), "timeout_s"),
    ],
)
def test_invalid_requests_are_invalid_argument_naming_the_field(
    worker: RunningWorker, request_: pb.GenerateRequest, field: str
) -> None:
    code, details = _code(worker.stub.Generate(request_))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith(field), details


def test_a_message_over_the_size_limit_is_refused_before_tokenizing(worker: RunningWorker) -> None:
    code, details = _code(worker.stub.Generate(text_request("x" * (2 * 1024 * 1024))))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in details
    assert worker.stub.GetLoad(pb.GetLoadRequest()).ready


def test_a_full_queue_is_resource_exhausted(worker: RunningWorker) -> None:
    # max_active=2, max_queue=2: four long requests fill every slot; the fifth is refused.
    calls = [worker.stub.Generate(text_request(params=LONG)) for _ in range(4)]
    try:
        assert wait_until(lambda: worker.engine.load_snapshot().queue_depth == 2)
        code, details = _code(worker.stub.Generate(text_request(params=LONG)))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_queue=2" in details
    finally:
        for c in calls:
            c.cancel()
    assert wait_until(lambda: worker.engine.load_snapshot().active == 0)


def test_cancelling_a_stream_stops_its_engine_work_within_a_step(worker: RunningWorker) -> None:
    call = worker.stub.Generate(text_request(params=LONG))
    first = next(call)
    assert first.HasField("commit")
    call.cancel()
    steps_at_cancel = worker.engine.load_snapshot().steps_total
    assert wait_until(lambda: worker.engine.load_snapshot().active == 0, timeout=5)
    # The step in progress may finish (and one more may start before the cancel reaches the engine).
    assert worker.engine.load_snapshot().steps_total - steps_at_cancel <= 2


@pytest.mark.parametrize("how", ["grpc_deadline", "timeout_s"])
def test_a_deadline_that_passes_is_deadline_exceeded(worker: RunningWorker, how: str) -> None:
    started = time.monotonic()
    if how == "grpc_deadline":
        call = worker.stub.Generate(text_request(params=LONG), timeout=0.5)
    else:
        call = worker.stub.Generate(text_request(params=LONG, timeout_s=0.5))
    code, _ = _code(call)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 5
    assert wait_until(lambda: worker.engine.load_snapshot().active == 0, timeout=5)


def test_out_of_memory_is_resource_exhausted_and_the_worker_stays_up(worker: RunningWorker) -> None:
    engine = worker.engine

    def oom(req: object) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    engine.runner.encode = oom
    try:
        code, details = _code(worker.stub.Generate(text_request()))
    finally:
        del engine.runner.encode
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "out of memory" in details
    params = pb.GenerationParams(max_new_tokens=8, max_denoising_steps=2, ignore_eos=True)  # EOS is not the point
    assert list(worker.stub.Generate(text_request(params=params)))[-1].final.stop_reason == pb.STOP_REASON_LENGTH


def test_an_unexpected_failure_is_internal_without_details(worker: RunningWorker) -> None:
    engine = worker.engine

    def boom(req: object) -> None:
        raise RuntimeError("secret stack detail")

    engine.runner.encode = boom
    try:
        code, details = _code(worker.stub.Generate(text_request(request_id="boom-1")))
    finally:
        del engine.runner.encode
    assert code == grpc.StatusCode.INTERNAL
    assert "secret" not in details and "Traceback" not in details
    assert "boom-1" in details


async def test_concurrent_streams_all_complete(worker: RunningWorker) -> None:
    params = pb.GenerationParams(max_new_tokens=24, max_denoising_steps=3, ignore_eos=True)
    async with grpc.aio.insecure_channel(worker.address) as channel:
        stub = pb_grpc.DenoiserStub(channel)

        async def one(i: int) -> pb.GenerateResponse:
            responses = [r async for r in stub.Generate(text_request(f"prompt {i}", params, request_id=str(i)))]
            return responses[-1]

        finals = await asyncio.gather(*(one(i) for i in range(4)))  # max_active 2 + max_queue 2
    assert sorted(f.request_id for f in finals) == ["0", "1", "2", "3"]
    assert all(f.final.stats.completion_tokens == 24 for f in finals)


async def test_watch_load_streams_reports(worker: RunningWorker) -> None:
    async with grpc.aio.insecure_channel(worker.address) as channel:
        stub = pb_grpc.DenoiserStub(channel)
        call = stub.WatchLoad(pb.WatchLoadRequest(interval_s=0.05))
        reports = []
        async for report in call:
            reports.append(report)
            if len(reports) == 3:
                call.cancel()
                break
    assert len(reports) == 3
    r = reports[-1]
    assert r.ready and not r.draining and r.model_name == "tiny" and r.canvas_length == 16
    assert r.capacity == 2 and r.max_queue == 2 and r.limits.max_prompt_tokens == 512
    assert reports[0].timestamp_unix_s <= r.timestamp_unix_s


def test_reflection_lists_the_services(worker: RunningWorker) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(worker.channel)
    responses = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in responses[0].list_services_response.service}
    assert {"dgemma.v1.Denoiser", "inference.GRPCInferenceService", "grpc.health.v1.Health"} <= names
