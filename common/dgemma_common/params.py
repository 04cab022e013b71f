"""Per-request generation settings: one typed model, the only place their types and ranges are written.

`GenerationSettings` is what a client may set (every field optional; unset means the server's default). Every
front end validates through it: the gateway's OpenAI layer and KServe front, and the worker's dgemma.v1 and
KServe servicers. Types are strict (a string is never a number, a bool never an integer, NaN and infinities
are refused) and unknown settings are an error naming them. `resolve` fills the unset fields from a server's
defaults and checks the server's `Limits`, giving the engine's `GenerationParams`.

A bad value raises `ParamError` naming the field, so every front end reports it the same way.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Annotated, Any, Self

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints, ValidationError, model_validator

from dgemma_common.logsafe import brief

MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_SEED = 2**63 - 1
# Counts travel as protobuf int64 and are compared with server limits far below this: a type bound, not a limit.
MAX_COUNT = 2**31 - 1
# A prompt is refused by its size before tokenizing: real tokenizers average ~4 bytes per token; 16 leaves room
# for long runs of whitespace or repeated characters without letting a client buy unbounded tokenizer time.
BYTES_PER_TOKEN = 16

# Strict: no coercion between types; NaN and infinities are not numbers; unknown fields are errors.
STRICT = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False, frozen=True)


class ParamError(ValueError):
    """A request setting is out of range; `field` names it."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
        self.reason = message

    def __reduce__(self) -> tuple[type[ParamError], tuple[str, str]]:
        # Raised in the gateway's image-decoding processes and pickled back to it.
        return ParamError, (self.field, self.reason)


@dataclass(frozen=True)
class Limits:
    """Server-side bounds on what a request may ask for."""

    max_new_tokens: int = 8192
    max_denoising_steps: int = 256
    max_prompt_tokens: int = 32768
    max_prompt_bytes: int | None = None  # None: BYTES_PER_TOKEN x max_prompt_tokens

    @property
    def prompt_byte_limit(self) -> int:
        """The largest text or chat prompt, in UTF-8 bytes, that is tokenized at all."""
        return prompt_byte_limit(self.max_prompt_tokens, self.max_prompt_bytes)


def prompt_byte_limit(max_prompt_tokens: int, max_prompt_bytes: int | None = None) -> int:
    """The largest prompt text in UTF-8 bytes: `max_prompt_bytes` if given, else BYTES_PER_TOKEN per token."""
    return max_prompt_bytes if max_prompt_bytes is not None else BYTES_PER_TOKEN * max_prompt_tokens


def utf8_size(strings: Iterable[str], bound: int) -> int:
    """The UTF-8 size of the strings together; exact up to `bound`, past it some number over it.

    Costs a length per string and one encode of those that may fit: a string with more characters than the bound
    is over it unencoded (a character is 1 to 4 bytes), and counting stops once the bound is passed.
    """
    total = 0
    for s in strings:
        total += len(s) if len(s) > bound else len(s.encode("utf-8", "surrogatepass"))
        if total > bound:
            break
    return total


def _one_or_many(value: Any) -> Any:
    # OpenAI's `stop` is a string or a list of strings; protobuf and JSON give lists. Anything else is left
    # for the strict tuple check to refuse.
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list):
        return tuple(value)
    return value


StopString = Annotated[str, StringConstraints(min_length=1, max_length=MAX_STOP_STRING_CHARS)]
StopStrings = Annotated[tuple[StopString, ...], BeforeValidator(_one_or_many), Field(max_length=MAX_STOP_STRINGS)]


def check_order(t_min: float | None, t_max: float | None) -> None:
    """The temperature schedule runs from t_max down to t_min."""
    if t_min is not None and t_max is not None and t_max < t_min:
        raise ParamError("t_max", f"must be >= t_min ({t_min}), got {t_max}")


class DenoisingKnobs(BaseModel):
    """DiffusionGemma's own knobs (and `seed`, `stop`), as every API spells them."""

    model_config = STRICT

    max_denoising_steps: Annotated[int, Field(ge=1, le=MAX_COUNT)] | None = None
    """Upper bound on decoder steps per canvas (the server's limit applies)."""
    t_min: Annotated[float, Field(gt=0.0, le=10.0)] | None = None
    """Final sampling temperature of the schedule."""
    t_max: Annotated[float, Field(gt=0.0, le=10.0)] | None = None
    """Initial sampling temperature of the schedule (>= t_min)."""
    entropy_bound: Annotated[float, Field(gt=0.0, le=1e6)] | None = None
    """Entropy bound for accepting tokens in one step."""
    stability_threshold: Annotated[int, Field(ge=0, le=64)] | None = None
    """Steps the argmax canvas must stay unchanged before it may stop."""
    confidence_threshold: Annotated[float, Field(gt=0.0, le=1e6)] | None = None
    """Mean entropy below which a stable canvas stops."""
    stop: StopStrings | None = None
    """Up to 16 strings (1-256 characters each) that end the reply; a single string is accepted."""
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] | None = None
    """Reproducible sampling."""
    stream_drafts: bool | None = None
    """Stream the canvas as it denoises (`dgemma.draft` events, Draft messages)."""
    draft_interval_s: Annotated[float, Field(ge=0.0, le=60.0)] | None = None
    """At most one draft per interval."""
    ignore_eos: bool | None = None
    """Keep generating past the end-of-sequence token."""

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        check_order(self.t_min, self.t_max)
        return self


class GenerationSettings(DenoisingKnobs):
    """Every generation setting a client may give; unset (None) fields take the server's defaults."""

    max_new_tokens: Annotated[int, Field(ge=1, le=MAX_COUNT)] | None = None
    """Completion budget in tokens (the server's limit applies)."""

    @classmethod
    def parse(cls, values: Mapping[str, Any]) -> GenerationSettings:
        """Validate a client's mapping (a JSON object, KServe parameters); ParamError names the first bad field."""
        try:
            return cls.model_validate(dict(values))
        except ValidationError as exc:
            raise param_error(exc) from None

    def given(self) -> dict[str, Any]:
        """The settings the client set, by name (for forwarding: the receiver's defaults fill the rest)."""
        return {name: value for name, value in self if value is not None}

    def resolve(self, defaults: GenerationParams, limits: Limits) -> GenerationParams:
        """The engine's params: these settings over `defaults`, checked against the server's `limits`."""
        values = {f.name: getattr(defaults, f.name) for f in fields(GenerationParams)}
        values.update(self.given())
        params = GenerationParams(**values)
        check_order(params.t_min, params.t_max)
        if params.max_new_tokens > limits.max_new_tokens:
            raise ParamError("max_new_tokens", f"must be in [1, {limits.max_new_tokens}], got {params.max_new_tokens}")
        if params.max_denoising_steps > limits.max_denoising_steps:
            raise ParamError("max_denoising_steps",
                             f"must be in [1, {limits.max_denoising_steps}], got {params.max_denoising_steps}")
        return params


@dataclass(frozen=True)
class GenerationParams:
    """The knobs of one request, every one set; defaults are the model's published ones.

    Build it from client input with `GenerationSettings.parse(...).resolve(defaults, limits)`; `validated`
    puts one built in code (server defaults, the CLI) through the same checks.
    """

    max_new_tokens: int = 256
    max_denoising_steps: int = 48
    t_min: float = 0.4
    t_max: float = 0.8
    entropy_bound: float = 0.1
    stability_threshold: int = 1
    confidence_threshold: float = 0.005
    stop: tuple[str, ...] = ()
    seed: int | None = None
    stream_drafts: bool = False
    draft_interval_s: float = 0.0
    ignore_eos: bool = False

    def validated(self, limits: Limits | None = None) -> GenerationParams:
        """Return self if every field is in range, else raise ParamError naming the first bad field."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        GenerationSettings.parse(values).resolve(self, limits or Limits())
        return self


FIELD_NAMES = frozenset(GenerationSettings.model_fields)


def params_from_mapping(
    values: Mapping[str, Any], base: GenerationParams | None = None, limits: Limits | None = None
) -> GenerationParams:
    """Validated params from a client's mapping over `base` (unknown keys are an error naming the key)."""
    return GenerationSettings.parse(values).resolve(base or GenerationParams(), limits or Limits())


def error_path(loc: tuple[int | str, ...]) -> str:
    """A pydantic error location as a client spells the field: `messages[0].content`.

    Union members and validator names (`str`, `list[int]`, `function-after[...]`) are not fields and are left out.
    """
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.isidentifier() and part not in _TYPE_TAGS:
            out += f".{part}" if out else part
    return out


def _depth(loc: tuple[int | str, ...]) -> int:
    return sum(1 for part in loc if isinstance(part, int) or (part.isidentifier() and part not in _TYPE_TAGS))


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "tuple", "dict", "none", "bytes"})


def param_error(exc: ValidationError) -> ParamError:
    """The first error of a validation as a ParamError naming its field, the input shown short and escaped."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    field = error_path(tuple(first["loc"]))
    cause = (first.get("ctx") or {}).get("error")
    if isinstance(cause, ParamError):  # raised by a model validator: it names the field under `loc`
        return ParamError(f"{field}.{cause.field}" if field else cause.field, cause.reason)
    base = error_path(tuple(first["loc"]))
    # A union reports one error per member; the member that got deepest into the value says the most.
    related = [e for e in errors if error_path(tuple(e["loc"])).startswith(base)]
    deepest = max(related, key=lambda e: (_depth(tuple(e["loc"])), e["type"] != "extra_forbidden"))
    if deepest is not first and error_path(tuple(deepest["loc"])) != base:
        first, field = deepest, error_path(tuple(deepest["loc"]))
    field = field or "body"
    message = str(first["msg"])
    if len(related) > 1 and error_path(tuple(first["loc"])) == base and first["type"] != "extra_forbidden":
        # Every member refused the value itself: say so, with what each expected.
        message = f"not one of the accepted forms ({'; '.join(sorted({str(e['msg']) for e in related})[:4])})"
    if first["type"] == "extra_forbidden":
        message = "unknown field"
    if "input" in first and first["type"] not in ("missing", "json_invalid", "extra_forbidden"):
        message = f"{message}, got {brief(first['input'])}"
    return ParamError(field, message)
