from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StopReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STOP_REASON_UNSPECIFIED: _ClassVar[StopReason]
    STOP_REASON_EOS: _ClassVar[StopReason]
    STOP_REASON_STOP_STRING: _ClassVar[StopReason]
    STOP_REASON_LENGTH: _ClassVar[StopReason]
    STOP_REASON_CANCELLED: _ClassVar[StopReason]
    STOP_REASON_DEADLINE: _ClassVar[StopReason]
    STOP_REASON_ERROR: _ClassVar[StopReason]
STOP_REASON_UNSPECIFIED: StopReason
STOP_REASON_EOS: StopReason
STOP_REASON_STOP_STRING: StopReason
STOP_REASON_LENGTH: StopReason
STOP_REASON_CANCELLED: StopReason
STOP_REASON_DEADLINE: StopReason
STOP_REASON_ERROR: StopReason

class Image(_message.Message):
    __slots__ = ("data", "mime_type")
    DATA_FIELD_NUMBER: _ClassVar[int]
    MIME_TYPE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    mime_type: str
    def __init__(self, data: _Optional[bytes] = ..., mime_type: _Optional[str] = ...) -> None: ...

class ContentPart(_message.Message):
    __slots__ = ("text", "image")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    text: str
    image: Image
    def __init__(self, text: _Optional[str] = ..., image: _Optional[_Union[Image, _Mapping]] = ...) -> None: ...

class ChatMessage(_message.Message):
    __slots__ = ("role", "content", "parts")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    PARTS_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    parts: _containers.RepeatedCompositeFieldContainer[ContentPart]
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ..., parts: _Optional[_Iterable[_Union[ContentPart, _Mapping]]] = ...) -> None: ...

class ChatMessages(_message.Message):
    __slots__ = ("messages",)
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    def __init__(self, messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ...) -> None: ...

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class Prompt(_message.Message):
    __slots__ = ("text", "chat", "tokens", "images")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    CHAT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    text: str
    chat: ChatMessages
    tokens: TokenIds
    images: _containers.RepeatedCompositeFieldContainer[Image]
    def __init__(self, text: _Optional[str] = ..., chat: _Optional[_Union[ChatMessages, _Mapping]] = ..., tokens: _Optional[_Union[TokenIds, _Mapping]] = ..., images: _Optional[_Iterable[_Union[Image, _Mapping]]] = ...) -> None: ...

class GenerationParams(_message.Message):
    __slots__ = ("max_new_tokens", "max_denoising_steps", "t_min", "t_max", "entropy_bound", "stability_threshold", "confidence_threshold", "stop", "seed", "stream_drafts", "draft_interval_s", "ignore_eos")
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_DENOISING_STEPS_FIELD_NUMBER: _ClassVar[int]
    T_MIN_FIELD_NUMBER: _ClassVar[int]
    T_MAX_FIELD_NUMBER: _ClassVar[int]
    ENTROPY_BOUND_FIELD_NUMBER: _ClassVar[int]
    STABILITY_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STREAM_DRAFTS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    max_new_tokens: int
    max_denoising_steps: int
    t_min: float
    t_max: float
    entropy_bound: float
    stability_threshold: int
    confidence_threshold: float
    stop: _containers.RepeatedScalarFieldContainer[str]
    seed: int
    stream_drafts: bool
    draft_interval_s: float
    ignore_eos: bool
    def __init__(self, max_new_tokens: _Optional[int] = ..., max_denoising_steps: _Optional[int] = ..., t_min: _Optional[float] = ..., t_max: _Optional[float] = ..., entropy_bound: _Optional[float] = ..., stability_threshold: _Optional[int] = ..., confidence_threshold: _Optional[float] = ..., stop: _Optional[_Iterable[str]] = ..., seed: _Optional[int] = ..., stream_drafts: _Optional[bool] = ..., draft_interval_s: _Optional[float] = ..., ignore_eos: _Optional[bool] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("request_id", "prompt", "params", "timeout_s")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt: Prompt
    params: GenerationParams
    timeout_s: float
    def __init__(self, request_id: _Optional[str] = ..., prompt: _Optional[_Union[Prompt, _Mapping]] = ..., params: _Optional[_Union[GenerationParams, _Mapping]] = ..., timeout_s: _Optional[float] = ...) -> None: ...

class Draft(_message.Message):
    __slots__ = ("canvas_index", "step", "token_ids", "text")
    CANVAS_INDEX_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    canvas_index: int
    step: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    def __init__(self, canvas_index: _Optional[int] = ..., step: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ...) -> None: ...

class Commit(_message.Message):
    __slots__ = ("canvas_index", "token_ids", "text")
    CANVAS_INDEX_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    canvas_index: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    def __init__(self, canvas_index: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ...) -> None: ...

class RequestStats(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens", "canvases", "decoder_passes", "encoder_passes", "queue_wait_s", "time_to_first_commit_s", "total_s", "tokens_per_forward")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CANVASES_FIELD_NUMBER: _ClassVar[int]
    DECODER_PASSES_FIELD_NUMBER: _ClassVar[int]
    ENCODER_PASSES_FIELD_NUMBER: _ClassVar[int]
    QUEUE_WAIT_S_FIELD_NUMBER: _ClassVar[int]
    TIME_TO_FIRST_COMMIT_S_FIELD_NUMBER: _ClassVar[int]
    TOTAL_S_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_FORWARD_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    canvases: int
    decoder_passes: int
    encoder_passes: int
    queue_wait_s: float
    time_to_first_commit_s: float
    total_s: float
    tokens_per_forward: float
    def __init__(self, prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., canvases: _Optional[int] = ..., decoder_passes: _Optional[int] = ..., encoder_passes: _Optional[int] = ..., queue_wait_s: _Optional[float] = ..., time_to_first_commit_s: _Optional[float] = ..., total_s: _Optional[float] = ..., tokens_per_forward: _Optional[float] = ...) -> None: ...

class Final(_message.Message):
    __slots__ = ("stop_reason", "stats")
    STOP_REASON_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    stop_reason: StopReason
    stats: RequestStats
    def __init__(self, stop_reason: _Optional[_Union[StopReason, str]] = ..., stats: _Optional[_Union[RequestStats, _Mapping]] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("request_id", "draft", "commit", "final")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    DRAFT_FIELD_NUMBER: _ClassVar[int]
    COMMIT_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    draft: Draft
    commit: Commit
    final: Final
    def __init__(self, request_id: _Optional[str] = ..., draft: _Optional[_Union[Draft, _Mapping]] = ..., commit: _Optional[_Union[Commit, _Mapping]] = ..., final: _Optional[_Union[Final, _Mapping]] = ...) -> None: ...

class GetLoadRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WatchLoadRequest(_message.Message):
    __slots__ = ("interval_s",)
    INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    interval_s: float
    def __init__(self, interval_s: _Optional[float] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_new_tokens", "max_denoising_steps", "max_prompt_tokens")
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_DENOISING_STEPS_FIELD_NUMBER: _ClassVar[int]
    MAX_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    max_new_tokens: int
    max_denoising_steps: int
    max_prompt_tokens: int
    def __init__(self, max_new_tokens: _Optional[int] = ..., max_denoising_steps: _Optional[int] = ..., max_prompt_tokens: _Optional[int] = ...) -> None: ...

class VisionSpec(_message.Message):
    __slots__ = ("patch_size", "pooling_kernel_size", "max_soft_tokens")
    PATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    POOLING_KERNEL_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_SOFT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    patch_size: int
    pooling_kernel_size: int
    max_soft_tokens: int
    def __init__(self, patch_size: _Optional[int] = ..., pooling_kernel_size: _Optional[int] = ..., max_soft_tokens: _Optional[int] = ...) -> None: ...

class LoadReport(_message.Message):
    __slots__ = ("queue_depth", "active", "capacity", "max_queue", "step_latency_s", "encoder_latency_s", "tokens_per_s", "canvas_length", "model_name", "model_revision", "ready", "draining", "steps_total", "tokens_total", "limits", "timestamp_unix_s", "vision", "encoder_token_latency_s", "busy_step_s")
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_FIELD_NUMBER: _ClassVar[int]
    STEP_LATENCY_S_FIELD_NUMBER: _ClassVar[int]
    ENCODER_LATENCY_S_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    CANVAS_LENGTH_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_REVISION_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    STEPS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    TOKENS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    VISION_FIELD_NUMBER: _ClassVar[int]
    ENCODER_TOKEN_LATENCY_S_FIELD_NUMBER: _ClassVar[int]
    BUSY_STEP_S_FIELD_NUMBER: _ClassVar[int]
    queue_depth: int
    active: int
    capacity: int
    max_queue: int
    step_latency_s: float
    encoder_latency_s: float
    tokens_per_s: float
    canvas_length: int
    model_name: str
    model_revision: str
    ready: bool
    draining: bool
    steps_total: int
    tokens_total: int
    limits: Limits
    timestamp_unix_s: float
    vision: VisionSpec
    encoder_token_latency_s: float
    busy_step_s: float
    def __init__(self, queue_depth: _Optional[int] = ..., active: _Optional[int] = ..., capacity: _Optional[int] = ..., max_queue: _Optional[int] = ..., step_latency_s: _Optional[float] = ..., encoder_latency_s: _Optional[float] = ..., tokens_per_s: _Optional[float] = ..., canvas_length: _Optional[int] = ..., model_name: _Optional[str] = ..., model_revision: _Optional[str] = ..., ready: _Optional[bool] = ..., draining: _Optional[bool] = ..., steps_total: _Optional[int] = ..., tokens_total: _Optional[int] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., timestamp_unix_s: _Optional[float] = ..., vision: _Optional[_Union[VisionSpec, _Mapping]] = ..., encoder_token_latency_s: _Optional[float] = ..., busy_step_s: _Optional[float] = ...) -> None: ...

class TokenizeRequest(_message.Message):
    __slots__ = ("prompt",)
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    prompt: Prompt
    def __init__(self, prompt: _Optional[_Union[Prompt, _Mapping]] = ...) -> None: ...

class TokenizeResponse(_message.Message):
    __slots__ = ("token_ids",)
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class DetokenizeRequest(_message.Message):
    __slots__ = ("token_ids",)
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class DetokenizeResponse(_message.Message):
    __slots__ = ("text",)
    TEXT_FIELD_NUMBER: _ClassVar[int]
    text: str
    def __init__(self, text: _Optional[str] = ...) -> None: ...
