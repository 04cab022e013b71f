"""The engine's public vocabulary: prompts, events, stats, load and errors."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field

from dgemma_common.images import VisionSpec


@dataclass(frozen=True)
class ImageData:
    """One encoded image as the client sent it (PNG, JPEG, WebP or GIF bytes); `dgemma_common.images` checks it."""

    data: bytes = field(repr=False)
    mime_type: str | None = None  # the type the client declared, if it declared one


# A part of a chat message: text, or an image at that place in the text.
ContentPart = str | ImageData


@dataclass(frozen=True)
class ChatMessage:
    """One turn of a chat prompt: plain text, or text and images in order."""

    role: str
    content: str | tuple[ContentPart, ...]

    @property
    def text(self) -> str:
        """The message's text, images left out."""
        if isinstance(self.content, str):
            return self.content
        return "".join(p for p in self.content if isinstance(p, str))

    @property
    def images(self) -> tuple[ImageData, ...]:
        """The message's images, in order."""
        if isinstance(self.content, str):
            return ()
        return tuple(p for p in self.content if isinstance(p, ImageData))


@dataclass(frozen=True)
class Prompt:
    """Exactly one of text, messages or token_ids is set. A text prompt may carry images, placed before the
    text; chat messages carry theirs in their content; token ids carry none."""

    text: str | None = None
    messages: tuple[ChatMessage, ...] | None = None
    token_ids: tuple[int, ...] | None = None
    images: tuple[ImageData, ...] = ()

    @property
    def all_images(self) -> tuple[ImageData, ...]:
        """Every image of the prompt, in prompt order."""
        if self.messages is not None:
            return tuple(i for m in self.messages for i in m.images)
        return self.images

    @staticmethod
    def of_text(text: str, images: Sequence[ImageData] = ()) -> Prompt:
        return Prompt(text=text, images=tuple(images))

    @staticmethod
    def of_messages(messages: Sequence[ChatMessage]) -> Prompt:
        return Prompt(messages=tuple(messages))

    @staticmethod
    def of_tokens(token_ids: Sequence[int]) -> Prompt:
        return Prompt(token_ids=tuple(token_ids))


class StopReason(enum.StrEnum):
    """Why a request ended."""

    EOS = "eos"
    STOP_STRING = "stop_string"
    LENGTH = "length"
    CANCELLED = "cancelled"
    DEADLINE = "deadline"
    ERROR = "error"


@dataclass
class RequestStats:
    """What one request cost, reported with its final event."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    canvases: int = 0
    decoder_passes: int = 0
    encoder_passes: int = 0
    encoder_s: float = 0.0  # time in the encoder passes that carried this request (batched passes, whole)
    queue_wait_s: float = 0.0
    time_to_first_commit_s: float | None = None
    total_s: float = 0.0

    @property
    def tokens_per_forward(self) -> float:
        return self.completion_tokens / self.decoder_passes if self.decoder_passes else 0.0


@dataclass(frozen=True)
class DraftEvent:
    """The current argmax canvas of the canvas being denoised; replaces the previous draft."""

    canvas_index: int
    step: int
    token_ids: tuple[int, ...]
    text: str


@dataclass(frozen=True)
class CommitEvent:
    """Finished text of one canvas (truncated at EOS, stop string or max_new_tokens): append it."""

    canvas_index: int
    token_ids: tuple[int, ...]
    text: str


@dataclass(frozen=True)
class FinalEvent:
    """The request is over; no event follows."""

    stop_reason: StopReason
    stats: RequestStats
    error: str | None = None
    error_kind: str | None = None  # "oom" | "internal" when stop_reason is ERROR


Event = DraftEvent | CommitEvent | FinalEvent


@dataclass(frozen=True)
class LoadSnapshot:
    """What the engine reports to a router: queue, activity, speed, readiness."""

    queue_depth: int
    active: int
    capacity: int
    max_queue: int
    step_latency_s: float
    tokens_per_s: float
    encoder_latency_s: float
    canvas_length: int
    model_name: str
    model_revision: str
    ready: bool
    draining: bool
    steps_total: int = 0
    tokens_total: int = 0
    vision: VisionSpec | None = None  # the model's image geometry; None: it takes no images
    encoder_token_latency_s: float = 0.0  # moving average of encoder seconds per prompt token
    # Engine wall time per decoder step while it has work: the step plus what runs between steps (commits,
    # scheduling, streaming), encoder passes excluded; what capacity is charged. 0.0: not measured yet.
    busy_step_s: float = 0.0
    busy_s_total: float = 0.0  # wall time the step thread had work since start (its utilization's numerator)


@dataclass
class Counters:
    """Monotonic totals since start, read by metrics exporters."""

    requests_by_outcome: dict[str, int] = field(default_factory=dict)
    tokens_generated: int = 0
    decoder_passes: int = 0
    encoder_passes: int = 0
    decoder_forward_s: float = 0.0  # time inside the model's decoder forward
    decoder_step_s: float = 0.0  # whole denoising steps: forward + sampling + bookkeeping
    busy_s: float = 0.0  # wall time the step thread had work: steps, encoder passes and everything between


class EngineError(Exception):
    """Base of the errors the engine raises to front ends."""


class OverloadedError(EngineError):
    """Admission refused: the active and queued slots are full."""


class NotReadyError(EngineError):
    """The engine is not loaded yet or is draining."""


class PromptTooLongError(EngineError):
    """The prompt exceeds the configured token limit."""

    def __init__(self, tokens: int, limit: int) -> None:
        super().__init__(f"prompt: {tokens} tokens exceeds the limit of {limit}")
        self.tokens = tokens
        self.limit = limit
