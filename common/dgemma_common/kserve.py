"""KServe v2 / Triton tensors <-> dgemma requests and events. Pure functions, shared with the gateway.

Tensor names follow Triton's vLLM backend where one exists, so existing Triton LLM clients work:

inputs   text_input           BYTES  [1]   prompt text (one of text_input, messages, input_ids)
         messages             BYTES  [1]   JSON list of {"role", "content"}; the chat template is applied.
                                            `content` is a string, or a list of {"type": "text", "text": ...}
                                            and {"type": "image"} parts (each takes the next `image`)
         input_ids            INT32 | INT64 [n]  prompt token ids, used as is
         image                BYTES  [n]   optional encoded images (PNG, JPEG, WebP, GIF), one per element:
                                            with text_input they come before the text; with messages, in
                                            the order of their {"type": "image"} parts
         sampling_parameters  BYTES  [1]   optional JSON object of generation settings (docs/worker.md)
         stream               BOOL   [1]   optional, accepted for vLLM-backend clients and ignored
outputs  text_output          BYTES  [1]   ModelInfer: the whole reply; ModelStreamInfer: one canvas
                                            (append), "" in the final response
         output_ids           INT64  [n]   the token ids of text_output
         stop_reason          BYTES  [1]   eos | stop_string | length (unary and final responses)

Request `parameters` may carry any generation setting too (they override sampling_parameters).
"""

from __future__ import annotations

import asyncio
import json
import struct
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as kpb

from dgemma_common.convert import validate_prompt
from dgemma_common.params import GenerationParams, Limits, ParamError, params_from_mapping
from dgemma_common.types import ChatMessage, CommitEvent, ContentPart, FinalEvent, ImageData, Prompt, RequestStats

PLATFORM = "dgemma"
TEXT_INPUT = "text_input"
MESSAGES = "messages"
INPUT_IDS = "input_ids"
IMAGE = "image"
SAMPLING_PARAMETERS = "sampling_parameters"
STREAM = "stream"
TEXT_OUTPUT = "text_output"
OUTPUT_IDS = "output_ids"
STOP_REASON = "stop_reason"
FINAL_FLAG = "triton_final_response"

INPUTS: tuple[tuple[str, str, list[int], bool], ...] = (
    # name, datatype, shape (-1: any), optional
    (TEXT_INPUT, "BYTES", [1], True),
    (MESSAGES, "BYTES", [1], True),
    (INPUT_IDS, "INT64", [-1], True),
    (IMAGE, "BYTES", [-1], True),
    (SAMPLING_PARAMETERS, "BYTES", [1], True),
    (STREAM, "BOOL", [1], True),
)
OUTPUTS: tuple[tuple[str, str, list[int]], ...] = (
    (TEXT_OUTPUT, "BYTES", [1]),
    (OUTPUT_IDS, "INT64", [-1]),
    (STOP_REASON, "BYTES", [1]),
)
OUTPUT_NAMES = frozenset(name for name, _, _ in OUTPUTS)
# Request parameters that belong to Triton or KServe rather than to generation.
_TRANSPORT_PARAMETERS = frozenset(
    {"priority", "timeout", "sequence_id", "sequence_start", "sequence_end", "binary_data_output", "headers"}
)
_ALIASES = {"max_tokens": "max_new_tokens"}  # vLLM's name for the same limit
_CONFIG_TYPES = {"BYTES": mc.TYPE_STRING, "INT64": mc.TYPE_INT64, "BOOL": mc.TYPE_BOOL}
_NP_TYPES = {"INT32": np.int32, "INT64": np.int64, "UINT32": np.uint32, "UINT64": np.uint64, "BOOL": np.bool_}


@dataclass(frozen=True)
class InferRequest:
    """What a KServe request asks for, in engine terms."""

    request_id: str
    prompt: Prompt
    params: GenerationParams
    outputs: frozenset[str]


def deserialize_bytes(raw: bytes) -> list[bytes]:
    """Triton's BYTES tensor wire format: each element is a 4-byte little-endian length, then the bytes."""
    items: list[bytes] = []
    offset = 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise ParamError("inputs", "malformed BYTES tensor")
        (n,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + n > len(raw):
            raise ParamError("inputs", "malformed BYTES tensor")
        items.append(raw[offset : offset + n])
        offset += n
    return items


def serialize_bytes(items: Iterable[bytes]) -> bytes:
    """The inverse of deserialize_bytes."""
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def _tensor_values(request: kpb.ModelInferRequest, index: int) -> list[Any]:
    tensor = request.inputs[index]
    dtype = tensor.datatype
    name = tensor.name
    if index < len(request.raw_input_contents):
        raw = request.raw_input_contents[index]
        if dtype == "BYTES":
            return list(deserialize_bytes(raw))
        if dtype not in _NP_TYPES:
            raise ParamError(name, f"unsupported datatype {dtype}")
        try:
            return list(np.frombuffer(raw, dtype=_NP_TYPES[dtype]).tolist())
        except ValueError as exc:
            raise ParamError(name, f"raw contents do not match datatype {dtype}") from exc
    contents = tensor.contents
    if dtype == "BYTES":
        return list(contents.bytes_contents)
    if dtype in ("INT32", "INT64"):
        return list(contents.int_contents) + list(contents.int64_contents)
    if dtype in ("UINT32", "UINT64"):
        return list(contents.uint_contents) + list(contents.uint64_contents)
    if dtype == "BOOL":
        return list(contents.bool_contents)
    raise ParamError(name, f"unsupported datatype {dtype}")


def _one_string(name: str, values: Sequence[Any]) -> str:
    if len(values) != 1:
        raise ParamError(name, f"must hold exactly one element, got {len(values)}")
    try:
        return bytes(values[0]).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ParamError(name, "must be UTF-8 text") from exc


def parameter_value(p: kpb.InferParameter) -> Any:
    kind = p.WhichOneof("parameter_choice")
    return None if kind is None else getattr(p, kind)


def client_settings(request: kpb.ModelInferRequest) -> dict[str, Any]:
    """The generation settings a request names: its sampling_parameters tensor, then its parameters."""
    sampling = next(
        (_tensor_values(request, i) for i, t in enumerate(request.inputs) if t.name == SAMPLING_PARAMETERS), None
    )
    return _settings(request, sampling)


def _settings(request: kpb.ModelInferRequest, sampling: list[Any] | None) -> dict[str, Any]:
    settings: dict[str, Any] = {}
    if sampling is not None:
        try:
            loaded = json.loads(_one_string(SAMPLING_PARAMETERS, sampling))
        except ValueError as exc:
            raise ParamError(SAMPLING_PARAMETERS, "must be a JSON object") from exc
        if not isinstance(loaded, dict):
            raise ParamError(SAMPLING_PARAMETERS, "must be a JSON object")
        settings.update(loaded)
    for key, value in request.parameters.items():
        if key.startswith("triton_") or key in _TRANSPORT_PARAMETERS:
            continue
        settings[key] = parameter_value(value)
    for alias, name in _ALIASES.items():
        if alias in settings:
            settings.setdefault(name, settings.pop(alias))
    return settings


StreamOut = asyncio.Queue[kpb.ModelStreamInferResponse | None]


async def decoupled_stream(
    requests: AsyncIterator[kpb.ModelInferRequest],
    handle: Callable[[kpb.ModelInferRequest, StreamOut], Coroutine[Any, Any, None]],
) -> AsyncIterator[kpb.ModelStreamInferResponse]:
    """ModelStreamInfer's fan-in: each request handled concurrently, its responses merged as they come.

    When the client half-closes, the requests in flight finish and the call ends; when the call ends
    early (the client went away), what is still running is cancelled, so its engine work stops.
    """
    out: StreamOut = asyncio.Queue()
    tasks: set[asyncio.Task[None]] = set()

    async def read() -> None:
        try:
            async for request in requests:
                task = asyncio.create_task(handle(request, out))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            while tasks:
                await asyncio.gather(*list(tasks), return_exceptions=True)
        finally:
            await out.put(None)

    reader = asyncio.create_task(read())
    try:
        while (item := await out.get()) is not None:
            yield item
        await reader  # a request stream that failed (a message that does not parse) ends the call with it
    finally:
        reader.cancel()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(reader, *tasks, return_exceptions=True)


def _prompt_from_inputs(tensors: Mapping[str, list[Any]]) -> Prompt:
    given = [n for n in (TEXT_INPUT, MESSAGES, INPUT_IDS) if n in tensors]
    if len(given) != 1:
        raise ParamError(TEXT_INPUT, f"give exactly one of {TEXT_INPUT}, {MESSAGES} or {INPUT_IDS}")
    images = [ImageData(bytes(b)) for b in tensors.get(IMAGE, [])]
    if TEXT_INPUT in tensors:
        return validate_prompt(Prompt.of_text(_one_string(TEXT_INPUT, tensors[TEXT_INPUT]), images))
    if INPUT_IDS in tensors:
        if images:
            raise ParamError(IMAGE, f"images go with {TEXT_INPUT} or {MESSAGES}, not {INPUT_IDS}")
        return validate_prompt(Prompt.of_tokens([int(i) for i in tensors[INPUT_IDS]]))
    try:
        raw = json.loads(_one_string(MESSAGES, tensors[MESSAGES]))
        if not isinstance(raw, list):
            raise TypeError("not a list")
        messages = [ChatMessage(str(m["role"]), _content(m["content"])) for m in raw]
    except (ValueError, TypeError, KeyError) as exc:
        raise ParamError(MESSAGES, 'must be a JSON list of {"role": ..., "content": ...}; content is a string '
                                   'or a list of {"type": "text", "text": ...} and {"type": "image"} parts') from exc
    return validate_prompt(Prompt.of_messages(_place_images(messages, images)))


def _content(value: Any) -> str | tuple[ContentPart, ...]:
    """A message's content: a string, or text parts and image placeholders (None until images are placed)."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise TypeError("content must be a string or a list of parts")
    parts: list[ContentPart] = []
    for part in value:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append(part["text"])
        elif kind == "image":
            parts.append(_PLACEHOLDER)
        else:
            raise TypeError("unknown part")
    return tuple(parts)


# Where an image of the `image` tensor goes, until `_place_images` puts it there.
_PLACEHOLDER = ImageData(b"")


def _place_images(messages: list[ChatMessage], images: list[ImageData]) -> list[ChatMessage]:
    """Each {"type": "image"} part takes the next image of the tensor; the counts must match."""
    slots = sum(1 for m in messages if not isinstance(m.content, str) for p in m.content if p is _PLACEHOLDER)
    if slots != len(images):
        raise ParamError(IMAGE, f"{len(images)} images given but the messages have {slots} image parts")
    queue = iter(images)
    return [m if isinstance(m.content, str) else
            ChatMessage(m.role, tuple(next(queue) if p is _PLACEHOLDER else p for p in m.content))
            for m in messages]


def request_from_infer(
    request: kpb.ModelInferRequest, defaults: GenerationParams, limits: Limits
) -> InferRequest:
    """Decode a ModelInferRequest into a prompt and validated params; ParamError names the bad part."""
    tensors: dict[str, list[Any]] = {}
    for i, tensor in enumerate(request.inputs):
        if tensor.name not in {n for n, _, _, _ in INPUTS}:
            raise ParamError(tensor.name, f"unknown input; inputs are {[n for n, _, _, _ in INPUTS]}")
        tensors[tensor.name] = _tensor_values(request, i)
    settings = _settings(request, tensors.get(SAMPLING_PARAMETERS))
    outputs = frozenset(o.name for o in request.outputs) or OUTPUT_NAMES
    unknown = sorted(outputs - OUTPUT_NAMES)
    if unknown:
        raise ParamError("outputs", f"unknown output {unknown[0]!r}; outputs are {sorted(OUTPUT_NAMES)}")
    return InferRequest(
        request_id=request.id,
        prompt=_prompt_from_inputs(tensors),
        params=params_from_mapping(settings, defaults, limits),
        outputs=outputs,
    )


def _response(model: str, request_id: str, outputs: frozenset[str], values: Mapping[str, Any],
              parameters: Mapping[str, Any]) -> kpb.ModelInferResponse:
    response = kpb.ModelInferResponse(model_name=model, model_version="1", id=request_id)
    for name, datatype, _ in OUTPUTS:
        if name not in outputs or name not in values:
            continue
        value = values[name]
        if datatype == "BYTES":
            raw = serialize_bytes([value.encode("utf-8")])
            shape = [1]
        else:
            raw = np.asarray(value, dtype=np.int64).tobytes()
            shape = [len(value)]
        response.outputs.append(kpb.ModelInferResponse.InferOutputTensor(name=name, datatype=datatype, shape=shape))
        response.raw_output_contents.append(raw)
    for key, value in parameters.items():
        _set_parameter(response.parameters[key], value)
    return response


def _set_parameter(p: kpb.InferParameter, value: Any) -> None:
    if isinstance(value, bool):
        p.bool_param = value
    elif isinstance(value, int):
        p.int64_param = value
    elif isinstance(value, float):
        p.double_param = value
    else:
        p.string_param = str(value)


def stats_parameters(final: FinalEvent) -> dict[str, Any]:
    """A final event as response parameters."""
    stats: RequestStats = final.stats
    out: dict[str, Any] = {
        "stop_reason": final.stop_reason.value,
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.completion_tokens,
        "canvases": stats.canvases,
        "decoder_passes": stats.decoder_passes,
        "encoder_passes": stats.encoder_passes,
        "queue_wait_s": float(stats.queue_wait_s),
        "total_s": float(stats.total_s),
        "tokens_per_forward": float(stats.tokens_per_forward),
    }
    if stats.time_to_first_commit_s is not None:
        out["time_to_first_commit_s"] = float(stats.time_to_first_commit_s)
    return out


def commit_response(model: str, req: InferRequest, commit: CommitEvent) -> kpb.ModelInferResponse:
    """One streamed response per committed canvas."""
    return _response(
        model, req.request_id, req.outputs,
        {TEXT_OUTPUT: commit.text, OUTPUT_IDS: list(commit.token_ids)},
        {"canvas_index": commit.canvas_index, FINAL_FLAG: False},
    )


def final_stream_response(model: str, req: InferRequest, final: FinalEvent) -> kpb.ModelInferResponse:
    """The last streamed response: empty text, the stop reason and the request's stats."""
    return _response(
        model, req.request_id, req.outputs,
        {TEXT_OUTPUT: "", OUTPUT_IDS: [], STOP_REASON: final.stop_reason.value},
        {**stats_parameters(final), FINAL_FLAG: True},
    )


def complete_response(
    model: str, req: InferRequest, commits: Sequence[CommitEvent], final: FinalEvent
) -> kpb.ModelInferResponse:
    """The unary ModelInfer response: the whole reply, the stop reason and the stats."""
    return _response(
        model, req.request_id, req.outputs,
        {
            TEXT_OUTPUT: "".join(c.text for c in commits),
            OUTPUT_IDS: [t for c in commits for t in c.token_ids],
            STOP_REASON: final.stop_reason.value,
        },
        stats_parameters(final),
    )


def model_metadata(model: str) -> kpb.ModelMetadataResponse:
    """ModelMetadata: the tensors above."""
    return kpb.ModelMetadataResponse(
        name=model,
        versions=["1"],
        platform=PLATFORM,
        inputs=[kpb.ModelMetadataResponse.TensorMetadata(name=n, datatype=d, shape=s) for n, d, s, _ in INPUTS],
        outputs=[kpb.ModelMetadataResponse.TensorMetadata(name=n, datatype=d, shape=s) for n, d, s in OUTPUTS],
    )


def model_config(model: str, max_active: int) -> kpb.ModelConfigResponse:
    """ModelConfig: decoupled (several responses per request), no client-side batching."""
    config = mc.ModelConfig(
        name=model,
        platform=PLATFORM,
        backend=PLATFORM,
        max_batch_size=0,
        input=[mc.ModelInput(name=n, data_type=_CONFIG_TYPES[d], dims=s, optional=o) for n, d, s, o in INPUTS],
        output=[mc.ModelOutput(name=n, data_type=_CONFIG_TYPES[d], dims=s) for n, d, s in OUTPUTS],
        model_transaction_policy=mc.ModelTransactionPolicy(decoupled=True),
        instance_group=[mc.ModelInstanceGroup(count=max_active, kind=mc.ModelInstanceGroup.KIND_AUTO)],
    )
    return kpb.ModelConfigResponse(config=config)
