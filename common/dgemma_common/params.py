"""Per-request generation settings and their validation.

Every knob a client may set is checked here, before anything reaches the model. A bad value raises
`ParamError` naming the field and its allowed range, so every front end (CLI, gRPC, HTTP) reports it
the same way.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_SEED = 2**63 - 1
# A prompt is refused by its size before tokenizing: real tokenizers average ~4 bytes per token; 16 leaves room
# for long runs of whitespace or repeated characters without letting a client buy unbounded tokenizer time.
BYTES_PER_TOKEN = 16


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
        return self.max_prompt_bytes if self.max_prompt_bytes is not None else BYTES_PER_TOKEN * self.max_prompt_tokens


@dataclass(frozen=True)
class GenerationParams:
    """The knobs of one request; defaults are the model's published ones."""

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
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def validated(self, limits: Limits | None = None) -> GenerationParams:
        """Return self if every field is in range, else raise ParamError naming the first bad field."""
        validate(self, limits or Limits())
        return self


FIELD_NAMES = frozenset(f.name for f in fields(GenerationParams)) - {"extra"}


def _int(name: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ParamError(name, f"must be an integer in [{lo}, {hi}], got {value!r}")
    if not lo <= value <= hi:
        raise ParamError(name, f"must be in [{lo}, {hi}], got {value}")
    return value


def _float(name: str, value: Any, lo: float, hi: float, *, lo_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ParamError(name, f"must be a finite number in {'(' if lo_open else '['}{lo}, {hi}], got {value!r}")
    if (value <= lo if lo_open else value < lo) or value > hi:
        raise ParamError(name, f"must be in {'(' if lo_open else '['}{lo}, {hi}], got {value}")
    return float(value)


def validate(params: GenerationParams, limits: Limits) -> None:
    """Raise ParamError for the first field outside its allowed range."""
    _int("max_new_tokens", params.max_new_tokens, 1, limits.max_new_tokens)
    _int("max_denoising_steps", params.max_denoising_steps, 1, limits.max_denoising_steps)
    _float("t_min", params.t_min, 0.0, 10.0, lo_open=True)
    _float("t_max", params.t_max, 0.0, 10.0, lo_open=True)
    if params.t_max < params.t_min:
        raise ParamError("t_max", f"must be >= t_min ({params.t_min}), got {params.t_max}")
    _float("entropy_bound", params.entropy_bound, 0.0, 1e6, lo_open=True)
    _int("stability_threshold", params.stability_threshold, 0, 64)
    _float("confidence_threshold", params.confidence_threshold, 0.0, 1e6, lo_open=True)
    _float("draft_interval_s", params.draft_interval_s, 0.0, 60.0)
    if params.seed is not None:
        _int("seed", params.seed, 0, MAX_SEED)
    if not isinstance(params.stop, tuple) or len(params.stop) > MAX_STOP_STRINGS:
        raise ParamError("stop", f"must be a list of at most {MAX_STOP_STRINGS} strings")
    for s in params.stop:
        if not isinstance(s, str) or not 1 <= len(s) <= MAX_STOP_STRING_CHARS:
            raise ParamError("stop", f"each stop string must have 1 to {MAX_STOP_STRING_CHARS} characters")
    if not isinstance(params.stream_drafts, bool):
        raise ParamError("stream_drafts", "must be a boolean")
    if not isinstance(params.ignore_eos, bool):
        raise ParamError("ignore_eos", "must be a boolean")


def params_from_mapping(
    values: Mapping[str, Any], base: GenerationParams | None = None, limits: Limits | None = None
) -> GenerationParams:
    """Build validated params from a client's mapping (unknown keys are an error naming the key)."""
    base = base or GenerationParams()
    unknown = sorted(set(values) - FIELD_NAMES)
    if unknown:
        raise ParamError(unknown[0], f"unknown setting; known settings are {sorted(FIELD_NAMES)}")
    updates = {k: v for k, v in values.items() if v is not None}
    if "stop" in updates:
        stop = updates["stop"]
        updates["stop"] = (stop,) if isinstance(stop, str) else tuple(stop) if isinstance(stop, list) else stop
    return replace(base, **updates).validated(limits)
