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
from typing import Any, TypeVar

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as kpb

from dgemma_common.convert import check_request_id, validate_prompt
from dgemma_common.logsafe import clip
from dgemma_common.openai_models import ImageSlotPart, TensorChatMessage, parse_messages_json
from dgemma_common.params import GenerationParams, GenerationSettings, Limits, ParamError, utf8_size
from dgemma_common.types import ChatMessage, CommitEvent, ContentPart, FinalEvent, ImageData, Prompt, RequestStats

PLATFORM = "dgemma"
TEXT_INPUT = "text_input"
MESSAGES = "messages"
DECODE_ON_THREAD_BYTES = 64 * 1024  # see decode_off_the_loop
T = TypeVar("T")
# JSON spends at most 6 bytes on one byte of text (`\u0000`); the slack holds the roles and brackets around it.
JSON_BYTES_PER_TEXT_BYTE = 6
MESSAGES_JSON_SLACK = 64 * 1024
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
LATENCY_TARGET = "latency_target_ms"  # read by the gateway's router; a worker has nothing to route
# Request parameters that belong to Triton, KServe or routing rather than to generation.
_TRANSPORT_PARAMETERS = frozenset(
    {"priority", "timeout", "sequence_id", "sequence_start", "sequence_end", "binary_data_output", "headers",
     LATENCY_TARGET}
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
    settings: Mapping[str, Any]  # what the client set itself (a gateway forwards only these)


def deserialize_bytes(raw: bytes, count: int | None = None, name: str = "inputs") -> list[memoryview]:
    """Triton's BYTES tensor wire format: each element is a 4-byte little-endian length, then the bytes.

    With `count`, exactly that many elements must fill `raw`; parsing stops there, so a tensor that
    declares one element costs one element's work whatever else it carries. The elements are views, not
    copies: a prompt is checked by its size before its bytes are copied or decoded.
    """
    view = memoryview(raw)
    items: list[memoryview] = []
    offset = 0
    while offset < len(raw) and (count is None or len(items) < count):
        if offset + 4 > len(raw):
            raise ParamError(name, "malformed BYTES tensor: a length prefix is cut short")
        (n,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + n > len(raw):
            raise ParamError(name, "malformed BYTES tensor: an element is longer than the data")
        items.append(view[offset : offset + n])
        offset += n
    if count is not None and (len(items) != count or offset != len(raw)):
        raise ParamError(name, f"the BYTES data does not hold exactly the {count} element(s) its shape declares")
    return items


def serialize_bytes(items: Iterable[bytes]) -> bytes:
    """The inverse of deserialize_bytes."""
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


# What each input may be: its datatypes, and how many elements it may hold (None: the prompt-token limit).
_ACCEPTED: dict[str, tuple[tuple[str, ...], int | None]] = {
    TEXT_INPUT: (("BYTES",), 1),
    MESSAGES: (("BYTES",), 1),
    INPUT_IDS: (("INT32", "INT64"), None),
    IMAGE: (("BYTES",), 64),  # the image limits (at most 8 by default) are checked where they are configured
    SAMPLING_PARAMETERS: (("BYTES",), 1),
    STREAM: (("BOOL",), 1),
}
# The `contents` field that carries each datatype when raw_input_contents is not used.
_CONTENTS = {"BYTES": "bytes_contents", "INT32": "int_contents", "INT64": "int64_contents", "BOOL": "bool_contents"}
_WIDTHS = {"INT32": ("<i4", 4), "INT64": ("<i8", 8), "BOOL": ("?", 1)}
MAX_REQUESTED_OUTPUTS = 16
MAX_PARAMETERS = 64
MAX_SAMPLING_PARAMETERS_BYTES = 64 * 1024


def element_count(name: str, shape: Sequence[int], limit: int) -> int:
    """The number of elements a shape declares, refused if a dimension is negative or the total over `limit`."""
    count = 1
    for dim in shape:
        if dim < 0:
            raise ParamError(name, f"shape {list(shape)} has a negative dimension")
        count *= dim
        if count > limit:
            raise ParamError(name, f"shape {list(shape)} declares more than the {limit} element(s) allowed")
    return count


def _tensor_values(request: kpb.ModelInferRequest, index: int, limits: Limits) -> list[Any]:
    """One input's elements, decoded by its declared datatype and shape; anything else is INVALID_ARGUMENT.

    Sizes are checked against the shape before any element is built, so no request costs more than a small
    multiple of its own size.
    """
    tensor = request.inputs[index]
    name, dtype = tensor.name, tensor.datatype
    datatypes, most = _ACCEPTED[name]
    if dtype not in datatypes:
        raise ParamError(name, f"must be a {' or '.join(datatypes)} tensor, got datatype {dtype[:32]!r}")
    count = element_count(name, tensor.shape, limits.max_prompt_tokens if most is None else most)
    if most == 1 and count != 1:
        raise ParamError(name, f"must hold exactly one element, got shape {list(tensor.shape)}")
    if request.raw_input_contents:
        raw = request.raw_input_contents[index]
        if tensor.HasField("contents"):
            raise ParamError(name, "give the data in raw_input_contents or in contents, not both")
        if dtype == "BYTES":
            return list(deserialize_bytes(raw, count, name))
        fmt, width = _WIDTHS[dtype]
        if len(raw) != count * width:
            raise ParamError(name, f"raw data of {len(raw)} bytes does not match shape {list(tensor.shape)} "
                                   f"of {dtype} ({count * width} bytes)")
        return list(np.frombuffer(raw, dtype=np.dtype(fmt)).tolist())
    set_fields = [f.name for f, _ in tensor.contents.ListFields()]
    if any(f != _CONTENTS[dtype] for f in set_fields):
        raise ParamError(name, f"a {dtype} tensor carries its data in contents.{_CONTENTS[dtype]}")
    values = getattr(tensor.contents, _CONTENTS[dtype])
    if len(values) != count:
        raise ParamError(name, f"holds {len(values)} element(s); its shape {list(tensor.shape)} declares {count}")
    return list(values)


def _one_string(name: str, values: Sequence[Any], max_bytes: int | None = None) -> str:
    """The one UTF-8 element of a BYTES tensor; with `max_bytes`, refused by its size before it is decoded."""
    if len(values) != 1 or not isinstance(values[0], bytes | memoryview):
        raise ParamError(name, "must hold exactly one BYTES element")
    if max_bytes is not None and len(values[0]) > max_bytes:
        raise ParamError(name, f"{len(values[0])} bytes exceeds the limit of {max_bytes} bytes before tokenizing")
    try:
        return str(values[0], "utf-8")
    except UnicodeDecodeError as exc:
        raise ParamError(name, "must be UTF-8 text") from exc


def parameter_value(p: kpb.InferParameter) -> Any:
    kind = p.WhichOneof("parameter_choice")
    return None if kind is None else getattr(p, kind)


def _settings(request: kpb.ModelInferRequest, sampling: list[Any] | None) -> dict[str, Any]:
    """The generation settings a request names: its sampling_parameters tensor, then its parameters."""
    settings: dict[str, Any] = {}
    if sampling is not None:
        text = _one_string(SAMPLING_PARAMETERS, sampling)
        if len(text) > MAX_SAMPLING_PARAMETERS_BYTES:
            raise ParamError(SAMPLING_PARAMETERS, f"must be at most {MAX_SAMPLING_PARAMETERS_BYTES} bytes")
        try:
            loaded = json.loads(text)
        except (ValueError, RecursionError):
            raise ParamError(SAMPLING_PARAMETERS, "must be a JSON object") from None
        if not isinstance(loaded, dict):
            raise ParamError(SAMPLING_PARAMETERS, "must be a JSON object")
        settings.update(loaded)
    if len(request.parameters) > MAX_PARAMETERS:
        raise ParamError("parameters", f"at most {MAX_PARAMETERS} request parameters, got {len(request.parameters)}")
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


def _prompt_from_inputs(tensors: Mapping[str, list[Any]], limits: Limits) -> Prompt:
    given = [n for n in (TEXT_INPUT, MESSAGES, INPUT_IDS) if n in tensors]
    if len(given) != 1:
        raise ParamError(TEXT_INPUT, f"give exactly one of {TEXT_INPUT}, {MESSAGES} or {INPUT_IDS}")
    images = [ImageData(bytes(b)) for b in tensors.get(IMAGE, [])]
    if TEXT_INPUT in tensors:
        return validate_prompt(Prompt.of_text(_one_string(TEXT_INPUT, tensors[TEXT_INPUT], limits.prompt_byte_limit),
                                              images))
    if INPUT_IDS in tensors:
        if images:
            raise ParamError(IMAGE, f"images go with {TEXT_INPUT} or {MESSAGES}, not {INPUT_IDS}")
        return validate_prompt(Prompt.of_tokens([int(i) for i in tensors[INPUT_IDS]]))
    raw = _messages(tensors[MESSAGES], limits.prompt_byte_limit)
    messages = [ChatMessage(m.template_role, _content(m)) for m in raw]
    return validate_prompt(Prompt.of_messages(_place_images(messages, images)))


def _messages(values: Sequence[Any], limit: int) -> list[TensorChatMessage]:
    """The messages tensor's chat, its text no more than `limit` bytes: JSON larger than any such chat can be
    is refused unread, and the text is measured once parsed (as text_input is and a chat completion's messages)."""
    raw = parse_messages_json(_one_string(MESSAGES, values, JSON_BYTES_PER_TEXT_BYTE * limit + MESSAGES_JSON_SLACK),
                              MESSAGES)
    if utf8_size((m.text() for m in raw), limit) > limit:
        raise ParamError(MESSAGES, f"the messages have more than {limit} bytes of text; the limit is {limit} bytes")
    return raw


def _content(message: TensorChatMessage) -> str | tuple[ContentPart, ...]:
    """A message's text, or its text parts and image placeholders (`_place_images` fills them)."""
    if not isinstance(message.content, list) or not message.has_images:
        return message.text()
    return tuple(_PLACEHOLDER if isinstance(p, ImageSlotPart) else p.text for p in message.content)


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


def decode_inputs(request: kpb.ModelInferRequest, limits: Limits) -> dict[str, list[Any]]:
    """Every input tensor by name, each decoded strictly (see `_tensor_values`)."""
    if len(request.inputs) > len(_ACCEPTED):
        raise ParamError("inputs", f"at most {len(_ACCEPTED)} inputs ({sorted(_ACCEPTED)}), got {len(request.inputs)}")
    if request.raw_input_contents and len(request.raw_input_contents) != len(request.inputs):
        raise ParamError("raw_input_contents", f"must hold one entry per input ({len(request.inputs)}), "
                                               f"got {len(request.raw_input_contents)}")
    tensors: dict[str, list[Any]] = {}
    for i, tensor in enumerate(request.inputs):
        if tensor.name not in _ACCEPTED:
            raise ParamError(clip(tensor.name, 64), f"unknown input; inputs are {sorted(_ACCEPTED)}")
        if tensor.name in tensors:
            raise ParamError(tensor.name, "given twice")
        tensors[tensor.name] = _tensor_values(request, i, limits)
    return tensors


async def decode_off_the_loop(request: kpb.ModelInferRequest, decode: Callable[[], T]) -> T:
    """`decode()` of this request, on a thread when the request is large: its messages JSON and tensors take
    ~2 ms a MB to parse and check (a 10 MB messages tensor stalled a front's event loop ~21 ms). A small one
    decodes in well under a millisecond, less than the hand-off."""
    if request.ByteSize() < DECODE_ON_THREAD_BYTES:
        return decode()
    return await asyncio.to_thread(decode)


def request_from_infer(
    request: kpb.ModelInferRequest, defaults: GenerationParams, limits: Limits
) -> InferRequest:
    """Decode a ModelInferRequest into a prompt and validated params; ParamError names the bad part."""
    check_request_id(request.id, "id")
    tensors = decode_inputs(request, limits)
    settings = GenerationSettings.parse(_settings(request, tensors.get(SAMPLING_PARAMETERS)))
    if len(request.outputs) > MAX_REQUESTED_OUTPUTS:
        raise ParamError("outputs", f"at most {MAX_REQUESTED_OUTPUTS} requested outputs")
    outputs = frozenset(o.name for o in request.outputs) or OUTPUT_NAMES
    unknown = sorted(outputs - OUTPUT_NAMES)
    if unknown:
        raise ParamError("outputs", f"unknown output {unknown[0]!r}; outputs are {sorted(OUTPUT_NAMES)}")
    return InferRequest(
        request_id=request.id,
        prompt=_prompt_from_inputs(tensors, limits),
        params=settings.resolve(defaults, limits),
        outputs=outputs,
        settings=settings.given(),
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
