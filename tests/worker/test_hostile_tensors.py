"""KServe tensors are decoded strictly by their declared datatype and shape (tritonclient and raw protobuf
against a real worker): nothing a client sends costs more memory than a small multiple of its own size."""

from __future__ import annotations

import struct

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.grpc import service_pb2 as kpb
from tritonclient.grpc import service_pb2_grpc as kpb_grpc
from tritonclient.utils import InferenceServerException

from tests.procmem import peak_rss_growth

from .conftest import RunningWorker

pytestmark = pytest.mark.timeout(120)
Tensor = kpb.ModelInferRequest.InferInputTensor


@pytest.mark.parametrize("n", [12_000_000, 2**40])
def test_an_integer_text_input_is_refused_without_building_that_many_bytes(worker: RunningWorker, n: int) -> None:
    client = tc.InferenceServerClient(worker.address)
    text = tc.InferInput("text_input", [1], "INT64")
    text.set_data_from_numpy(np.array([n], dtype=np.int64))
    with peak_rss_growth() as growth, pytest.raises(InferenceServerException) as info:
        client.infer("tiny", [text])
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert info.value.message().startswith("text_input: must be a BYTES tensor")
    assert growth.mib < 64, f"an 8-byte tensor grew the worker's peak RSS by {growth.mib:.0f} MiB"
    client.close()


def _raw(*tensors: tuple[Tensor, bytes], **kw: object) -> kpb.ModelInferRequest:
    return kpb.ModelInferRequest(model_name="tiny", inputs=[t for t, _ in tensors],
                                 raw_input_contents=[r for _, r in tensors], **kw)


def _bytes_tensor(*items: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(i)) + i for i in items)


HELLO = (Tensor(name="text_input", datatype="BYTES", shape=[1]), _bytes_tensor(b"Hello"))
BAD_REQUESTS = [
    # A shape that declares more elements than a tensor may hold, or more than its data carries.
    (_raw((Tensor(name="text_input", datatype="BYTES", shape=[2**40]), _bytes_tensor(b"a"))), "text_input: shape"),
    (_raw((Tensor(name="text_input", datatype="BYTES", shape=[1]), _bytes_tensor(b"a", b"b"))), "text_input"),
    (_raw((Tensor(name="text_input", datatype="BYTES", shape=[1]), b"\xff\xff\xff\x7fab")), "text_input: malformed"),
    (_raw((Tensor(name="text_input", datatype="BYTES", shape=[-1]), _bytes_tensor(b"a"))), "text_input: shape"),
    # Token ids: only INT32/INT64, as many bytes as the shape says, at most the prompt-token limit.
    (_raw((Tensor(name="input_ids", datatype="FP32", shape=[2]), b"\0" * 8)), "input_ids: must be a INT32 or INT64"),
    (_raw((Tensor(name="input_ids", datatype="INT64", shape=[3]), b"\0" * 8)), "input_ids: raw data of 8 bytes"),
    (_raw((Tensor(name="input_ids", datatype="INT64", shape=[10**6]), b"\0" * 8)), "input_ids: shape"),
    (kpb.ModelInferRequest(model_name="tiny", inputs=[Tensor(
        name="input_ids", datatype="INT64", shape=[3], contents=kpb.InferTensorContents(int64_contents=[5]))]),
     "input_ids: holds 1 element(s)"),
    (kpb.ModelInferRequest(model_name="tiny", inputs=[Tensor(
        name="input_ids", datatype="INT64", shape=[1], contents=kpb.InferTensorContents(fp32_contents=[5.0]))]),
     "input_ids: a INT64 tensor carries its data in contents.int64_contents"),
    # The request as a whole.
    (_raw(HELLO, HELLO), "text_input: given twice"),
    (kpb.ModelInferRequest(model_name="tiny", inputs=[HELLO[0], HELLO[0]], raw_input_contents=[HELLO[1]]),
     "raw_input_contents: must hold one entry per input"),
    (_raw(HELLO, (Tensor(name="sampling_parameters", datatype="BYTES", shape=[1]),
                  _bytes_tensor(b"[" * 50_000))), "sampling_parameters: must be a JSON object"),
    (_raw(HELLO, (Tensor(name="sampling_parameters", datatype="INT64", shape=[1]), b"\0" * 8)),
     "sampling_parameters: must be a BYTES tensor"),
    (_raw(HELLO, (Tensor(name="messages", datatype="BYTES", shape=[1]),
                  _bytes_tensor(b'[{"role": 1, "content": "x"}]'))), "text_input: give exactly one"),
    (_raw((Tensor(name="messages", datatype="BYTES", shape=[1]),
           _bytes_tensor(b'[{"role": 1, "content": "x"}]'))), "messages[0].role: Input should be"),
    (_raw(HELLO, outputs=[kpb.ModelInferRequest.InferRequestedOutputTensor(name="text_output")] * 100), "outputs"),
]


@pytest.mark.parametrize(("request_", "message"), BAD_REQUESTS)
def test_malformed_tensors_are_invalid_argument_naming_the_tensor(
        worker: RunningWorker, request_: kpb.ModelInferRequest, message: str) -> None:
    with grpc.insecure_channel(worker.address) as channel:
        stub = kpb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(request_, timeout=30)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert info.value.details().startswith(message), info.value.details()


def test_a_well_formed_raw_request_still_works(worker: RunningWorker) -> None:
    ids = np.array([2, 40, 41], dtype=np.int32)
    request = _raw((Tensor(name="input_ids", datatype="INT32", shape=[3]), ids.tobytes()))
    request.parameters["max_new_tokens"].int64_param = 8
    request.parameters["max_denoising_steps"].int64_param = 2
    with grpc.insecure_channel(worker.address) as channel:
        reply = kpb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60)
    assert reply.outputs[1].name == "output_ids" and reply.outputs[1].shape[0] <= 8


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0])
def test_non_finite_or_negative_durations_are_invalid_argument(worker: RunningWorker, value: float) -> None:
    from dgemma_proto.dgemma.v1 import denoiser_pb2 as pb

    with pytest.raises(grpc.RpcError) as info:
        list(worker.stub.Generate(pb.GenerateRequest(prompt=pb.Prompt(text="hi"), timeout_s=value), timeout=30))
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT and info.value.details().startswith("timeout_s")
    if value != -1.0:  # a negative interval is clamped to the minimum, as documented
        # A NaN interval used to slip through the clamp and stream load reports in a tight loop.
        with pytest.raises(grpc.RpcError) as info:
            list(worker.stub.WatchLoad(pb.WatchLoadRequest(interval_s=value), timeout=30))
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details().startswith("interval_s")


def test_a_messages_tensor_is_bounded_before_and_after_it_is_parsed(worker: RunningWorker) -> None:
    """The worker's front by the same rule as the gateway's (tests/gateway/test_kserve_messages.py): JSON larger
    than any chat within the worker's prompt byte limit is refused unread, the chat's text by its bytes."""
    limit = worker.server.runtime.config.limits.prompt_byte_limit
    client = tc.InferenceServerClient(worker.address)

    def refusal(content: str) -> str:
        tensor = tc.InferInput("messages", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([f'[{{"role": "user", "content": "{content}"}}]'.encode()], dtype=object))
        with pytest.raises(InferenceServerException) as info:
            client.infer("tiny", [tensor])
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
        return str(info.value.message())

    try:
        assert "exceeds the limit" in refusal("x" * (6 * limit + 65 * 1024))
        assert refusal("x" * (limit + 1)).endswith(f"more than {limit} bytes of text; the limit is {limit} bytes")
    finally:
        client.close()
