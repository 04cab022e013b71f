"""dgemma.v1 protobuf messages <-> the engine's types. Pure functions; the servicer only calls these."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dgemma_common.params import GenerationParams, GenerationSettings, Limits, ParamError
from dgemma_common.types import (
    ChatMessage,
    CommitEvent,
    DraftEvent,
    Event,
    FinalEvent,
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
    return prompt


def prompt_from_pb(msg: pb.Prompt, limits: Limits) -> Prompt:
    """The engine prompt for a protobuf prompt; exactly one kind must be set.

    Counts are checked before anything is copied out of the message, so a message full of token ids or
    messages costs no Python objects beyond the limit.
    """
    kind = msg.WhichOneof("kind")
    if kind == "text":
        prompt = Prompt.of_text(msg.text)
    elif kind == "chat":
        if len(msg.chat.messages) > MAX_CHAT_MESSAGES:
            raise ParamError("prompt.chat", f"at most {MAX_CHAT_MESSAGES} messages, got {len(msg.chat.messages)}")
        prompt = Prompt.of_messages([ChatMessage(m.role, m.content) for m in msg.chat.messages])
    elif kind == "tokens":
        if len(msg.tokens.ids) > limits.max_prompt_tokens:
            raise PromptTooLongError(len(msg.tokens.ids), limits.max_prompt_tokens)
        prompt = Prompt.of_tokens(list(msg.tokens.ids))
    else:
        raise ParamError("prompt", "set one of prompt.text, prompt.chat or prompt.tokens")
    return validate_prompt(prompt)


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
    )


def token_ids_from_pb(ids: Any, field: str = "token_ids", limit: int | None = None) -> list[int]:
    """Token ids from a repeated field, refusing negative ones (and more than `limit`, before copying)."""
    if limit is not None and len(ids) > limit:
        raise ParamError(field, f"at most {limit} ids, got {len(ids)}")
    out = [int(i) for i in ids]
    if out and min(out) < 0:
        raise ParamError(field, "token ids must be >= 0")
    return out
