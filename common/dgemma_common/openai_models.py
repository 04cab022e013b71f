"""The OpenAI request bodies dgemma accepts: one typed model per endpoint, the source of validation and of the
gateway's OpenAPI document.

Every field OpenAI defines is type-checked, also those a diffusion model ignores (`temperature` must be a
number in [0, 2] even though it changes nothing); NaN and infinities are not numbers; a field OpenAI does not
define is refused as OpenAI itself refuses it (400 naming the field). DiffusionGemma's own knobs come from
`DenoisingKnobs`, so they are spelled and bounded exactly as in every other API. Server limits that depend on
configuration (largest `max_tokens`, `n`) are checked by the gateway after parsing.

Other runtimes forward these models (vLLM, hosted APIs). A content part is text or an image (`image_url`: a data:
URL, or an http(s) URL the gateway may fetch); the KServe `messages` tensor uses the same messages with
`{"type": "image"}` parts standing for the elements of its `image` tensor (`TensorChatMessage`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StringConstraints,
    Tag,
    TypeAdapter,
    ValidationError,
    model_validator,
)

from dgemma_common.params import MAX_COUNT, DenoisingKnobs, GenerationSettings, ParamError, param_error

STRICT = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False, frozen=True, use_attribute_docstrings=True)
MAX_MESSAGES = 4096
ShortText = Annotated[str, StringConstraints(max_length=256)]
Name = Annotated[str, StringConstraints(min_length=1, max_length=256)]
JsonObject = dict[str, Any]
LatencyTargetMs = Annotated[float, Field(gt=0.0, le=3_600_000.0)]
_LATENCY_TARGET: TypeAdapter[float] = TypeAdapter(LatencyTargetMs, config=ConfigDict(strict=True, allow_inf_nan=False))
# Roles as the chat template knows them: OpenAI's `developer` is the template's `system`.
TEMPLATE_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class TextPart(BaseModel):
    """A text content part."""

    model_config = STRICT
    type: Literal["text"]
    text: str


class ImageUrl(BaseModel):
    """Where an image part's bytes are."""

    model_config = STRICT
    url: Annotated[str, StringConstraints(min_length=1)]
    """A data: URL (base64 PNG, JPEG, WebP or GIF), or an http(s) URL on the gateway's --image-url-hosts."""
    detail: Literal["auto", "low", "high"] | None = None
    """Accepted; the model's own resolution is used."""


class ImageUrlPart(BaseModel):
    """An image content part (user messages only)."""

    model_config = STRICT
    type: Literal["image_url"]
    image_url: ImageUrl


class ImageSlotPart(BaseModel):
    """KServe only: an image part whose bytes are the next element of the request's `image` tensor."""

    model_config = STRICT
    type: Literal["image"]


def _part_type(value: Any) -> str | None:
    """The tag of a content part. Tags are not identifiers, so the field paths of errors leave them out:
    `messages[0].content[1].image_url.url`, not `...content[1].image_url.image_url.url`."""
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return f"type={kind}" if isinstance(kind, str) else None


ContentPart = Annotated[
    Annotated[TextPart, Tag("type=text")] | Annotated[ImageUrlPart, Tag("type=image_url")],
    Discriminator(_part_type, custom_error_type="content_part",
                  custom_error_message='a content part is {"type": "text", ...} or {"type": "image_url", ...}')]
TensorContentPart = Annotated[
    Annotated[TextPart, Tag("type=text")] | Annotated[ImageSlotPart, Tag("type=image")],
    Discriminator(_part_type, custom_error_type="content_part",
                  custom_error_message='a content part is {"type": "text", ...} or {"type": "image"}')]


class ChatMessage(BaseModel):
    """One message of a chat; `role` is one of system, developer, user, assistant."""

    model_config = STRICT
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    """A string, or a list of text and image parts (text parts alone are joined); null for an empty turn."""
    name: Name | None = None
    """Accepted and ignored."""
    refusal: str | None = None
    """Accepted (assistant turns replayed from a response) and ignored."""
    tool_calls: list[JsonObject] | None = None
    """Tool calling is not supported: must be empty."""
    function_call: JsonObject | None = None
    """Function calling is not supported: must be null."""
    audio: JsonObject | None = None
    """Accepted and ignored."""

    @model_validator(mode="after")
    def _no_tools(self) -> Self:
        if self.tool_calls:
            raise ParamError("tool_calls", "tool calling is not supported")
        if self.function_call is not None:
            raise ParamError("function_call", "function calling is not supported")
        if self.role != "user" and isinstance(self.content, list):
            for i, part in enumerate(self.content):
                if isinstance(part, ImageUrlPart):
                    raise ParamError(f"content[{i}]", "images go in user messages")
        return self

    @property
    def template_role(self) -> str:
        """The role the chat template sees."""
        return TEMPLATE_ROLES[self.role]

    @property
    def has_images(self) -> bool:
        """Whether the content has image parts."""
        return isinstance(self.content, list) and any(not isinstance(p, TextPart) for p in self.content)

    def text(self) -> str:
        """The content's text as one string (image parts left out)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content if isinstance(part, TextPart))


class TensorChatMessage(ChatMessage):
    """A message of the KServe `messages` tensor: `{"type": "image"}` parts take the `image` tensor's elements."""

    content: str | list[TensorContentPart] | None = None  # type: ignore[assignment]
    """A string, or a list of text and image parts (text parts alone are joined); null for an empty turn."""


class StreamOptions(BaseModel):
    """Options of a streamed reply."""

    model_config = STRICT
    include_usage: bool | None = None
    """Send a last chunk with the usage and no choices."""
    include_obfuscation: bool | None = None
    """Accepted and ignored."""
    continuous_usage_stats: bool | None = None
    """Accepted (vLLM's option) and ignored."""


class _CompletionBase(DenoisingKnobs):
    """Fields common to chat and text completions."""

    model_config = STRICT
    model: Name
    """The served model name."""
    max_tokens: Annotated[int, Field(ge=1, le=MAX_COUNT)] | None = None
    """Completion budget in tokens (the gateway's --max-tokens bounds it)."""
    n: Annotated[int, Field(ge=1, le=MAX_COUNT)] | None = None
    """Choices to generate (the gateway's --max-n bounds it)."""
    stream: bool | None = None
    """Reply as server-sent events."""
    stream_options: StreamOptions | None = None
    latency_target_ms: LatencyTargetMs | None = None
    """End-to-end latency target; also the header x-dgemma-latency-target-ms."""
    latency_strict: bool | None = None
    """429 instead of routing a request that is predicted to miss its target."""
    timeout_s: Annotated[float, Field(gt=0.0, le=3600.0)] | None = None
    """Deadline of the request (504 when it passes upstream)."""
    # OpenAI's autoregressive sampling knobs mean nothing to a diffusion model: type-checked, then ignored.
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    """Accepted and ignored."""
    top_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    """Accepted and ignored."""
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    """Accepted and ignored."""
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    """Accepted and ignored."""
    logit_bias: Annotated[dict[ShortText, Annotated[float, Field(ge=-100.0, le=100.0)]],
                          Field(max_length=1024)] | None = None
    """Accepted and ignored."""
    user: ShortText | None = None
    """Accepted and ignored."""
    top_k: Annotated[int, Field(ge=-1, le=MAX_COUNT)] | None = None
    """Accepted (vLLM's knob) and ignored."""
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    """Accepted (vLLM's knob) and ignored."""
    repetition_penalty: Annotated[float, Field(gt=0.0)] | None = None
    """Accepted (vLLM's knob) and ignored."""
    min_tokens: Annotated[int, Field(ge=0, le=MAX_COUNT)] | None = None
    """Accepted (vLLM's knob) and ignored."""

    def generation_settings(self, max_new_tokens: int) -> GenerationSettings:
        """The generation settings this request gives, with its completion budget."""
        knobs = {name: value for name, value in self if name in DenoisingKnobs.model_fields and value is not None}
        return GenerationSettings.parse({**knobs, "max_new_tokens": max_new_tokens})


class ChatCompletionRequest(_CompletionBase):
    """POST /v1/chat/completions."""

    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    """The conversation; the worker applies the model's chat template."""
    max_completion_tokens: Annotated[int, Field(ge=1, le=MAX_COUNT)] | None = None
    """OpenAI's newer name for max_tokens; wins when both are given."""
    logprobs: bool | None = None
    """Log probabilities are not supported: must be false."""
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    """Accepted and ignored."""
    tools: list[JsonObject] | None = None
    """Tool calling is not supported: must be empty."""
    tool_choice: ShortText | JsonObject | None = None
    """Accepted and ignored."""
    parallel_tool_calls: bool | None = None
    """Accepted and ignored."""
    functions: list[JsonObject] | None = None
    """Function calling is not supported: must be empty."""
    function_call: ShortText | JsonObject | None = None
    """Accepted and ignored."""
    response_format: JsonObject | None = None
    """Accepted and ignored."""
    metadata: Annotated[dict[Annotated[str, StringConstraints(max_length=64)],
                             Annotated[str, StringConstraints(max_length=512)]],
                        Field(max_length=16)] | None = None
    """Accepted and ignored."""
    store: bool | None = None
    """Accepted and ignored."""
    service_tier: ShortText | None = None
    """Accepted and ignored."""
    reasoning_effort: ShortText | None = None
    """Accepted and ignored."""
    verbosity: ShortText | None = None
    """Accepted and ignored."""
    modalities: Annotated[list[ShortText], Field(max_length=8)] | None = None
    """Accepted and ignored."""
    prediction: JsonObject | None = None
    """Accepted and ignored."""
    audio: JsonObject | None = None
    """Accepted and ignored."""
    web_search_options: JsonObject | None = None
    """Accepted and ignored."""
    moderation: JsonObject | None = None
    """Accepted and ignored."""
    safety_identifier: ShortText | None = None
    """Accepted and ignored."""
    prompt_cache_key: ShortText | None = None
    """Accepted and ignored."""
    prompt_cache_retention: ShortText | None = None
    """Accepted and ignored."""
    prompt_cache_options: JsonObject | None = None
    """Accepted and ignored."""

    @model_validator(mode="after")
    def _unsupported(self) -> Self:
        if self.tools:
            raise ParamError("tools", "tool calling is not supported")
        if self.functions:
            raise ParamError("functions", "function calling is not supported")
        if self.logprobs:
            raise ParamError("logprobs", "log probabilities are not supported")
        return self

    @property
    def token_field(self) -> str:
        """The field that set the completion budget, for error messages."""
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    @property
    def requested_tokens(self) -> int | None:
        """The completion budget the client asked for, if any."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


TokenIds = Annotated[list[Annotated[int, Field(ge=0, le=MAX_COUNT)]], Field(min_length=1)]


class CompletionRequest(_CompletionBase):
    """POST /v1/completions."""

    prompt: Annotated[str, StringConstraints(min_length=1)] | Annotated[
        list[Annotated[str, StringConstraints(min_length=1)]], Field(min_length=1, max_length=1)] | TokenIds
    """A non-empty string, a list of one string, or a list of token ids (one prompt per request)."""
    logprobs: Annotated[int, Field(ge=0, le=0)] | None = None
    """Log probabilities are not supported: must be 0 or null."""
    echo: bool | None = None
    """Accepted and ignored."""
    best_of: Annotated[int, Field(ge=1, le=20)] | None = None
    """Accepted and ignored."""
    suffix: str | None = None
    """Accepted and ignored."""

    @property
    def token_field(self) -> str:
        """The field that sets the completion budget, for error messages."""
        return "max_tokens"

    @property
    def requested_tokens(self) -> int | None:
        """The completion budget the client asked for, if any."""
        return self.max_tokens


def parse_json(model: type[_CompletionBase], raw: bytes) -> Any:
    """A request body parsed and validated in one pass; ParamError names the first bad field.

    pydantic's JSON parser bounds nesting depth, so a deeply nested body is a 400, not a RecursionError.
    """
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise param_error(exc) from None


# JSON is parsed holding the GIL (~0.2 us per value), on whichever event loop received it: a body with too many
# values is refused before parsing. No legitimate request comes near it (4096 messages are ~16k values).
MAX_JSON_VALUES = 2**17


# json_values counts a slice at a time: `count` holds the GIL (~0.5 ms a MiB), and between slices a thread that
# counts a large body lets the event loop run.
_COUNT_SLICE = 1 << 20


def json_values(raw: str | bytes) -> int:
    """An upper bound on the number of values in a JSON text (its commas and colons), at memchr speed."""
    if isinstance(raw, str):
        return sum(raw.count(c, i, i + _COUNT_SLICE) for i in range(0, len(raw), _COUNT_SLICE) for c in ",:")
    return sum(raw.count(c, i, i + _COUNT_SLICE) for i in range(0, len(raw), _COUNT_SLICE) for c in (b",", b":"))


_MESSAGES = TypeAdapter(Annotated[list[TensorChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)])


def parse_messages_json(raw: str | bytes, field: str = "messages") -> list[TensorChatMessage]:
    """A JSON list of chat messages (as in a chat completion, with KServe's image parts), validated like one;
    ParamError names the field."""
    if json_values(raw) > MAX_JSON_VALUES:
        raise ParamError(field, f"holds more than {MAX_JSON_VALUES} JSON values")
    try:
        return _MESSAGES.validate_json(raw)
    except ValidationError as exc:
        error = param_error(exc)
        name = field if error.field == "body" else f"{field}{error.field}" if error.field.startswith("[") \
            else f"{field}.{error.field}"
        raise ParamError(name, error.reason) from None


def latency_target_ms(value: Any, field: str = "latency_target_ms") -> float:
    """A latency target from outside a request body (a header, a KServe parameter), checked like the body's field."""
    try:
        return _LATENCY_TARGET.validate_python(value)
    except ValidationError as exc:
        raise ParamError(field, param_error(exc).reason) from None
