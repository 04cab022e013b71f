"""Hypothesis-generated protobuf messages, and raw bytes that are no protobuf at all, against every RPC of the
worker's Denoiser and KServe services and the gateway's KServe front. Invariants: no INTERNAL or UNKNOWN (those
mean a bug in our code), no call left hanging, and afterwards both processes healthy and not grown beyond a
bound (checked by the fixture's `check_invariants`)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import Descriptor
from google.protobuf.message import DecodeError
from google.protobuf.message_factory import GetMessageClass
from hypothesis import given
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2 as kpb

from dgemma_common import kserve
from dgemma_proto.dgemma.v1 import denoiser_pb2 as pb
from tests.fuzz.conftest import API_KEY, FUZZ, MODEL, FuzzStack, describe
from tests.fuzz.protobuf import messages

pytestmark = pytest.mark.timeout(300)

# Codes that mean the server failed (a bug), or a call that never ended (a hang).
BUGS = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED})
# Longer than any request the fuzzed stack's limits allow (a few canvases of 4 steps): running out is a hang.
CALL_DEADLINE_S = 30.0


@dataclass(frozen=True)
class Rpc:
    """One method: where it is served, its request type, and its shape."""

    server: str  # "worker" or "gateway"
    method: str
    request: Descriptor
    kind: str  # "unary", "stream" (server-streaming), "bidi"
    read: int = 10_000  # responses read before the client hangs up (WatchLoad never ends by itself)

    @property
    def surface(self) -> str:
        return f"{self.server} {self.method.rsplit('/', 1)[1]}"


DENOISER = "/dgemma.v1.Denoiser/"
KSERVE = "/inference.GRPCInferenceService/"
KSERVE_METHODS = [
    ("ModelInfer", kpb.ModelInferRequest, "unary"), ("ModelStreamInfer", kpb.ModelInferRequest, "bidi"),
    ("ModelMetadata", kpb.ModelMetadataRequest, "unary"), ("ModelConfig", kpb.ModelConfigRequest, "unary"),
    ("ModelReady", kpb.ModelReadyRequest, "unary"), ("ServerMetadata", kpb.ServerMetadataRequest, "unary"),
]
RPCS = [
    Rpc("worker", DENOISER + "Generate", pb.GenerateRequest.DESCRIPTOR, "stream"),
    Rpc("worker", DENOISER + "Tokenize", pb.TokenizeRequest.DESCRIPTOR, "unary"),
    Rpc("worker", DENOISER + "Detokenize", pb.DetokenizeRequest.DESCRIPTOR, "unary"),
    Rpc("worker", DENOISER + "GetLoad", pb.GetLoadRequest.DESCRIPTOR, "unary"),
    Rpc("worker", DENOISER + "WatchLoad", pb.WatchLoadRequest.DESCRIPTOR, "stream", read=1),
    *(Rpc(server, KSERVE + name, request.DESCRIPTOR, kind)
      for server in ("worker", "gateway") for name, request, kind in KSERVE_METHODS),
]

TENSORS = [name for name, _, _, _ in kserve.INPUTS]
DATATYPES = ["BYTES", "INT64", "INT32", "UINT64", "UINT32", "UINT8", "BOOL", "FP32", "FP64", "FP16", "BF16"]
SETTINGS = st.fixed_dictionaries({}, optional={
    "max_tokens": st.integers(-2, 40), "max_denoising_steps": st.integers(-1, 6), "seed": st.integers(-1, 2**64),
    "t_min": st.floats(), "stop": st.lists(st.text(max_size=4), max_size=3), "ignore_eos": st.booleans(),
    "stream_drafts": st.booleans(), "timeout_s": st.floats(),
})


def _one_of_or(values: list[str], other: st.SearchStrategy[str] | None = None) -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(values), other if other is not None else st.text(max_size=12))


# Values that steer the servers past their first checks: the served model, known tensors and datatypes,
# chat roles, settings as JSON.
OVERRIDES: dict[str, st.SearchStrategy[Any]] = {
    "dgemma.v1.ChatMessage.role": _one_of_or(["user", "system", "assistant", "developer"]),
    "inference.ModelInferRequest.model_name": _one_of_or([MODEL]),
    "inference.ModelInferRequest.model_version": _one_of_or(["", "1"]),
    "inference.ModelInferRequest.InferInputTensor.name": _one_of_or(TENSORS),
    "inference.ModelInferRequest.InferInputTensor.datatype": _one_of_or(DATATYPES),
    "inference.ModelInferRequest.InferRequestedOutputTensor.name": _one_of_or(["text_output", "output_ids"]),
    "inference.InferTensorContents.bytes_contents": st.lists(st.one_of(
        st.binary(max_size=32), st.text(max_size=32).map(str.encode), SETTINGS.map(lambda s: json.dumps(s).encode()),
    ), max_size=3),
    **{f"inference.{m}.name": _one_of_or([MODEL]) for m in ("ModelMetadataRequest", "ModelConfigRequest",
                                                            "ModelReadyRequest")},
    **{f"inference.{m}.version": _one_of_or(["", "1"]) for m in ("ModelMetadataRequest", "ModelConfigRequest",
                                                                 "ModelReadyRequest")},
}


def _call(channel: grpc.Channel, rpc: Rpc, payload: bytes, metadata: tuple[tuple[str, str], ...] = ()
          ) -> grpc.StatusCode:
    """Send bytes as they are (no serializer) and read what comes back; the final status."""
    try:
        if rpc.kind == "unary":
            channel.unary_unary(rpc.method)(payload, timeout=CALL_DEADLINE_S, metadata=metadata)
            return grpc.StatusCode.OK
        responses: Iterator[bytes]
        if rpc.kind == "stream":
            responses = channel.unary_stream(rpc.method)(payload, timeout=CALL_DEADLINE_S, metadata=metadata)
        else:
            responses = channel.stream_stream(rpc.method)(iter([payload]), timeout=CALL_DEADLINE_S,
                                                          metadata=metadata)
        for i, _ in enumerate(responses, 1):
            if i >= rpc.read:
                responses.cancel()  # type: ignore[attr-defined]
                return grpc.StatusCode.OK
        return grpc.StatusCode.OK
    except grpc.RpcError as err:
        return err.code()  # type: ignore[no-any-return]


def _asks_for_a_short_deadline(rpc: Rpc, payload: bytes) -> bool:
    """The message parses and sets its own `timeout_s` shorter than the client's deadline."""
    if "timeout_s" not in rpc.request.fields_by_name:
        return False
    try:
        timeout_s = GetMessageClass(rpc.request).FromString(payload).timeout_s
    except DecodeError:
        return False
    return 0 < timeout_s < CALL_DEADLINE_S


def _show(rpc: Rpc, payload: bytes) -> str:
    try:
        return f"{rpc.request.full_name} {{{describe(str(GetMessageClass(rpc.request).FromString(payload)))}}}"
    except DecodeError:
        return f"bytes {describe(payload)}"


def _address(stack: FuzzStack, rpc: Rpc) -> str:
    return stack.worker_address if rpc.server == "worker" else stack.gateway.grpc_address


def _fuzz(stack: FuzzStack, rpc: Rpc, payloads: st.SearchStrategy[bytes], tag: str) -> None:
    with grpc.insecure_channel(_address(stack, rpc)) as channel:

        @FUZZ
        @given(payloads, st.integers(0, 3).map(lambda draw: draw == 0))
        def one(payload: bytes, keyless: bool) -> None:
            # The gateway's KServe port wants the API key: three cases in four carry it, so that they reach the
            # decoding and the workers; a keyless one gets UNAUTHENTICATED whatever its bytes.
            keyed = rpc.server == "gateway" and not keyless
            code = _call(channel, rpc, payload, (("authorization", f"Bearer {API_KEY}"),) if keyed else ())
            if rpc.server == "gateway" and keyless:
                assert code == grpc.StatusCode.UNAUTHENTICATED, f"{code.name} without a key"
            stack.count(f"{rpc.surface} ({tag})", code.name)
            if code == grpc.StatusCode.DEADLINE_EXCEEDED and _asks_for_a_short_deadline(rpc, payload):
                return  # the request's own timeout_s ran out before its work did: the answer it asked for
            assert code not in BUGS, f"{rpc.surface} answered {code.name} to {_show(rpc, payload)}"

        one()
    stack.check_invariants()


@pytest.mark.parametrize("rpc", RPCS, ids=lambda r: r.surface)
def test_generated_messages_never_get_internal_unknown_or_hang(fuzz_stack: FuzzStack, rpc: Rpc) -> None:
    _fuzz(fuzz_stack, rpc, messages(rpc.request, OVERRIDES).map(lambda m: m.SerializeToString()), "messages")


@pytest.mark.parametrize("rpc", [r for r in RPCS if r.request.fields], ids=lambda r: r.surface)
def test_bytes_that_are_no_protobuf_never_get_internal_unknown_or_hang(fuzz_stack: FuzzStack, rpc: Rpc) -> None:
    # Tag 0 and wire type 7 do not exist: these can never parse, whatever follows.
    garbage = st.one_of(st.binary(max_size=128).map(lambda b: b"\x07" + b), st.binary(max_size=128))
    _fuzz(fuzz_stack, rpc, garbage, "raw bytes")

