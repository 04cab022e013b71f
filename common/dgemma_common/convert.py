"""dgemma.v1 protobuf messages <-> the engine's types. Pure functions; the servicer only calls these."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dgemma_common.images import VisionSpec
from dgemma_common.params import GenerationParams, GenerationSettings, Limits, ParamError
from dgemma_common.types import (
    ChatMessage,
    CommitEvent,
    ContentPart,
    DraftEvent,
    Event,
    FinalEvent,
    ImageData,
    LoadSnapshot,
    Prompt,
    PromptTooLongError,
    RequestStats,
    StopReason,
)
from dgemma_proto.dgemma.v1 import denoiser_pb2 as pb

MAX_CHAT_MESSAGES = 4096
# A client's request id is echoed in every response and written to logs: bounded, so it cannot multiply either.
MAX_REQUEST_ID_CHARS = 256

STOP_REASONS: dict[StopReason, int] = {
    StopReason.EOS: pb.STOP_REASON_EOS,
    StopReason.STOP_STRING: pb.STOP_REASON_STOP_STRING,
    StopReason.LENGTH: pb.STOP_REASON_LENGTH,
    StopReason.CANCELLED: pb.STOP_REASON_CANCELLED,
    StopReason.DEADLINE: pb.STOP_REASON_DEADLINE,
    StopReason.ERROR: pb.STOP_REASON_ERROR,
}


def check_request_id(request_id: str, field: str = "request_id") -> str:
    """A client's request id, refused if longer than MAX_REQUEST_ID_CHARS (logs escape what it contains)."""
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        raise ParamError(field, f"at most {MAX_REQUEST_ID_CHARS} characters, got {len(request_id)}")
    return request_id


def validate_prompt(prompt: Prompt) -> Prompt:
    """Refuse empty prompts and impossible token ids before they reach the engine."""
    if prompt.text is not None and prompt.text == "":
        raise ParamError("prompt.text", "must not be empty")
    if prompt.messages is not None:
        if not prompt.messages:
            raise ParamError("prompt.chat", "must have at least one message")
        for i, m in enumerate(prompt.messages):
            if not m.role:
                raise ParamError(f"prompt.chat.messages[{i}].role", "must not be empty")
    if prompt.token_ids is not None:
        if not prompt.token_ids:
            raise ParamError("prompt.tokens", "must have at least one token id")
        if min(prompt.token_ids) < 0:
            raise ParamError("prompt.tokens", "token ids must be >= 0")
    if prompt.images and prompt.text is None:
        raise ParamError("prompt.images", "only a text prompt carries images here; chat messages carry theirs "
                                          "in their parts, token prompts none")
    return prompt


def _message_from_pb(m: pb.ChatMessage, where: str) -> ChatMessage:
    if not m.parts:
        return ChatMessage(m.role, m.content)
    if m.content:
        raise ParamError(f"{where}.content", "leave content empty when parts are given")
    parts: list[ContentPart] = []
    for j, part in enumerate(m.parts):
        which = part.WhichOneof("kind")
        if which == "text":
            parts.append(part.text)
        elif which == "image":
            parts.append(_image_from_pb(part.image))
        else:
            raise ParamError(f"{where}.parts[{j}]", "set text or image")
    return ChatMessage(m.role, tuple(parts))


def _image_from_pb(image: pb.Image) -> ImageData:
    return ImageData(image.data, image.mime_type or None)


def _image_to_pb(image: ImageData) -> pb.Image:
    return pb.Image(data=image.data, mime_type=image.mime_type or "")


def prompt_from_pb(msg: pb.Prompt, limits: Limits) -> Prompt:
    """The engine prompt for a protobuf prompt; exactly one kind must be set.

    Counts are checked before anything is copied out of the message, so a message full of token ids or
    messages costs no Python objects beyond the limit.
    """
    kind = msg.WhichOneof("kind")
    images = tuple(_image_from_pb(i) for i in msg.images)
    if kind == "text":
        prompt = Prompt.of_text(msg.text, images)
    elif kind == "chat":
        if len(msg.chat.messages) > MAX_CHAT_MESSAGES:
            raise ParamError("prompt.chat", f"at most {MAX_CHAT_MESSAGES} messages, got {len(msg.chat.messages)}")
        messages = [_message_from_pb(m, f"prompt.chat.messages[{i}]") for i, m in enumerate(msg.chat.messages)]
        prompt = Prompt(messages=tuple(messages), images=images)
    elif kind == "tokens":
        if len(msg.tokens.ids) > limits.max_prompt_tokens:
            raise PromptTooLongError(len(msg.tokens.ids), limits.max_prompt_tokens)
        prompt = Prompt(token_ids=tuple(msg.tokens.ids), images=images)
    else:
        raise ParamError("prompt", "set one of prompt.text, prompt.chat or prompt.tokens")
    return validate_prompt(prompt)


def prompt_to_pb(prompt: Prompt) -> pb.Prompt:
    """The protobuf prompt for an engine prompt (the gateway's KServe front forwards what it decoded)."""
    images = [_image_to_pb(i) for i in prompt.images]
    if prompt.text is not None:
        return pb.Prompt(text=prompt.text, images=images)
    if prompt.messages is not None:
        return pb.Prompt(chat=pb.ChatMessages(messages=[_message_to_pb(m) for m in prompt.messages]))
    return pb.Prompt(tokens=pb.TokenIds(ids=list(prompt.token_ids or ())))


def _message_to_pb(m: ChatMessage) -> pb.ChatMessage:
    if isinstance(m.content, str):
        return pb.ChatMessage(role=m.role, content=m.content)
    parts = [pb.ContentPart(text=p) if isinstance(p, str) else pb.ContentPart(image=_image_to_pb(p))
             for p in m.content]
    return pb.ChatMessage(role=m.role, parts=parts)


def settings_from_pb(msg: pb.GenerationParams) -> GenerationSettings:
    """The settings a protobuf message sets (unset optional fields, an empty stop list and false flags are not)."""
    values: dict[str, Any] = {f.name: list(v) if f.name == "stop" else v for f, v in msg.ListFields()}
    return GenerationSettings.parse(values)


def settings_to_pb(given: Mapping[str, Any]) -> pb.GenerationParams:
    """Protobuf params for validated settings (`GenerationSettings.given()`); the receiver's defaults fill the rest."""
    values: dict[str, Any] = {k: list(v) if k == "stop" else v for k, v in given.items()}
    return pb.GenerationParams(**values)


def params_from_pb(msg: pb.GenerationParams, defaults: GenerationParams, limits: Limits) -> GenerationParams:
    """Request params: the set fields over the server defaults, validated against the limits."""
    return settings_from_pb(msg).resolve(defaults, limits)


def stats_to_pb(stats: RequestStats) -> pb.RequestStats:
    """Protobuf request stats."""
    out = pb.RequestStats(
        prompt_tokens=stats.prompt_tokens,
        completion_tokens=stats.completion_tokens,
        canvases=stats.canvases,
        decoder_passes=stats.decoder_passes,
        encoder_passes=stats.encoder_passes,
        queue_wait_s=stats.queue_wait_s,
        total_s=stats.total_s,
        tokens_per_forward=stats.tokens_per_forward,
    )
    if stats.time_to_first_commit_s is not None:
        out.time_to_first_commit_s = stats.time_to_first_commit_s
    return out


def event_to_pb(request_id: str, event: Event) -> pb.GenerateResponse:
    """One streamed Generate response for an engine event."""
    if isinstance(event, DraftEvent):
        return pb.GenerateResponse(
            request_id=request_id,
            draft=pb.Draft(
                canvas_index=event.canvas_index, step=event.step, token_ids=event.token_ids, text=event.text
            ),
        )
    if isinstance(event, CommitEvent):
        return pb.GenerateResponse(
            request_id=request_id,
            commit=pb.Commit(canvas_index=event.canvas_index, token_ids=event.token_ids, text=event.text),
        )
    if isinstance(event, FinalEvent):
        return pb.GenerateResponse(
            request_id=request_id,
            final=pb.Final(stop_reason=STOP_REASONS[event.stop_reason], stats=stats_to_pb(event.stats)),  # type: ignore[arg-type]
        )
    raise TypeError(f"not an engine event: {event!r}")


def vision_to_pb(spec: VisionSpec | None) -> pb.VisionSpec | None:
    """The protobuf vision spec, or None for a model that takes no images."""
    if spec is None:
        return None
    return pb.VisionSpec(patch_size=spec.patch_size, pooling_kernel_size=spec.pooling_kernel_size,
                         max_soft_tokens=spec.max_soft_tokens)


def vision_from_pb(report: pb.LoadReport) -> VisionSpec | None:
    """The vision spec a load report carries, or None when its model takes no images."""
    if not report.HasField("vision"):
        return None
    v = report.vision
    return VisionSpec(patch_size=v.patch_size, pooling_kernel_size=v.pooling_kernel_size,
                      max_soft_tokens=v.max_soft_tokens)


def load_to_pb(snap: LoadSnapshot, limits: Limits, timestamp: float) -> pb.LoadReport:
    """A protobuf load report for an engine snapshot."""
    return pb.LoadReport(
        queue_depth=snap.queue_depth,
        active=snap.active,
        capacity=snap.capacity,
        max_queue=snap.max_queue,
        step_latency_s=snap.step_latency_s,
        encoder_latency_s=snap.encoder_latency_s,
        tokens_per_s=snap.tokens_per_s,
        canvas_length=snap.canvas_length,
        model_name=snap.model_name,
        model_revision=snap.model_revision,
        ready=snap.ready,
        draining=snap.draining,
        steps_total=snap.steps_total,
        tokens_total=snap.tokens_total,
        limits=pb.Limits(
            max_new_tokens=limits.max_new_tokens,
            max_denoising_steps=limits.max_denoising_steps,
            max_prompt_tokens=limits.max_prompt_tokens,
        ),
        timestamp_unix_s=timestamp,
        vision=vision_to_pb(snap.vision),
        encoder_token_latency_s=snap.encoder_token_latency_s,
        busy_step_s=snap.busy_step_s,
    )


def token_ids_from_pb(ids: Any, field: str = "token_ids", limit: int | None = None) -> list[int]:
    """Token ids from a repeated field, refusing negative ones (and more than `limit`, before copying)."""
    if limit is not None and len(ids) > limit:
        raise ParamError(field, f"at most {limit} ids, got {len(ids)}")
    out = [int(i) for i in ids]
    if out and min(out) < 0:
        raise ParamError(field, "token ids must be >= 0")
    return out
