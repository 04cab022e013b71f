"""The routing pipeline: filters narrow the candidates, scorers rate them in [0, 1], a picker chooses.

Each plugin is a small class in its own module under `plugins/`, registered with a type name and a
typed parameter dataclass (with defaults). A YAML profile says which plugins run, with which
parameters and, for scorers, which weight:

    name: latency-target
    filters:
      - type: model-match
      - type: latency-target
        params: {slack: 0.9, strict: false}
    scorers:
      - {type: cost, weight: 1.0}
    picker: {type: max-score}

`route` is a pure function of the pipeline, the request, the candidates and the time.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import yaml

from dgemma_gateway.routing.predict import Prediction, predict, target_s
from dgemma_gateway.types import Candidate, RouteRequest


class ProfileError(ValueError):
    """A routing profile names an unknown plugin or a bad parameter."""


@dataclass
class Context:
    """What one routing decision knows and learns; plugins may add predictions and notes."""

    request: RouteRequest
    now: float
    predictions: dict[str, Prediction] = field(default_factory=dict)
    # Set by the latency-target filter: will the chosen endpoint meet the target? (None: no target policy)
    expect_met: bool | None = None
    reason: str = ""
    retry_after_s: float | None = None  # set by a filter that refuses, for a 429's Retry-After


class Filter(Protocol):
    """Keeps the candidates that may take the request."""

    def filter(self, ctx: Context, candidates: Sequence[Candidate]) -> list[Candidate]: ...


class Scorer(Protocol):
    """Rates each candidate in [0, 1]; higher is better."""

    def score(self, ctx: Context, candidates: Sequence[Candidate]) -> list[float]: ...


class Picker(Protocol):
    """Chooses one of the scored candidates."""

    def pick(self, ctx: Context, scored: Sequence[tuple[Candidate, float]]) -> Candidate | None: ...


P = TypeVar("P")


@dataclass(frozen=True)
class PluginType:
    """A registered plugin: its kind, type name, parameter dataclass and factory."""

    kind: str  # "filter" | "scorer" | "picker"
    type_name: str
    params_type: type[Any]
    factory: Callable[[Any], Any]


PLUGINS: dict[str, PluginType] = {}

C = TypeVar("C")


def plugin(kind: str, type_name: str, params_type: type[Any]) -> Callable[[type[C]], type[C]]:
    """Class decorator: register a plugin whose constructor takes one `params_type` instance."""

    def register(cls: type[C]) -> type[C]:
        if type_name in PLUGINS:
            raise RuntimeError(f"routing plugin {type_name!r} registered twice")
        PLUGINS[type_name] = PluginType(kind, type_name, params_type, cls)
        cls.type_name = type_name  # type: ignore[attr-defined]
        return cls

    return register


@dataclass(frozen=True)
class WeightedScorer:
    """A scorer and its weight in the profile."""

    scorer: Scorer
    weight: float


@dataclass(frozen=True)
class Pipeline:
    """A loaded profile: filters, weighted scorers and a picker."""

    name: str
    filters: tuple[Filter, ...]
    scorers: tuple[WeightedScorer, ...]
    picker: Picker


@dataclass(frozen=True)
class Decision:
    """The outcome of routing one request."""

    endpoint: Candidate | None
    prediction: Prediction | None
    expect_met: bool | None
    target_s: float | None  # the target that applies on the chosen endpoint
    reason: str  # why nothing was chosen, or "" when something was
    considered: int
    scores: tuple[tuple[str, float], ...] = ()
    retry_after_s: float | None = None


def route(pipeline: Pipeline, request: RouteRequest, candidates: Sequence[Candidate], now: float) -> Decision:
    """Run the pipeline: filters in order, then the weighted mean of the scorers, then the picker."""
    ctx = Context(request=request, now=now)
    remaining = list(candidates)
    for f in pipeline.filters:
        remaining = f.filter(ctx, remaining)
        if not remaining:
            reason = ctx.reason or f"no endpoint passed the {getattr(f, 'type_name', type(f).__name__)} filter"
            return Decision(None, None, ctx.expect_met, None, reason, len(candidates), (), ctx.retry_after_s)
    totals = [0.0] * len(remaining)
    weight_sum = sum(w.weight for w in pipeline.scorers)
    for ws in pipeline.scorers:
        for i, s in enumerate(ws.scorer.score(ctx, remaining)):
            totals[i] += ws.weight * min(1.0, max(0.0, s))
    scored = [(c, (t / weight_sum) if weight_sum > 0 else 0.0) for c, t in zip(remaining, totals, strict=True)]
    chosen = pipeline.picker.pick(ctx, scored)
    if chosen is None:
        return Decision(None, None, ctx.expect_met, None, ctx.reason or "the picker chose nothing", len(candidates))
    prediction = ctx.predictions.get(chosen.endpoint_id) or predict(chosen, request)
    return Decision(
        endpoint=chosen,
        prediction=prediction,
        expect_met=ctx.expect_met,
        target_s=target_s(request, chosen.variant),
        reason="",
        considered=len(candidates),
        scores=tuple((c.endpoint_id, s) for c, s in scored),
    )


def _coerce(name: str, hint: Any, value: Any) -> Any:
    origin = typing.get_origin(hint)
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is bool and isinstance(value, bool):
        return value
    if hint is str and isinstance(value, str):
        return value
    if origin is typing.Literal and value in typing.get_args(hint):
        return value
    raise ProfileError(f"parameter {name!r}: expected {getattr(hint, '__name__', hint)}, got {value!r}")


def build_params(params_type: type[P], raw: Mapping[str, Any] | None, where: str) -> P:
    """A plugin's parameter dataclass from a YAML mapping; unknown or mistyped keys are an error."""
    raw = dict(raw or {})
    hints = typing.get_type_hints(params_type)
    names = {f.name for f in dataclasses.fields(params_type)}  # type: ignore[arg-type]
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ProfileError(f"{where}: unknown parameter {unknown[0]!r}; known: {sorted(names)}")
    values = {k: _coerce(f"{where}.{k}", hints[k], v) for k, v in raw.items()}
    return params_type(**values)


def _instantiate(kind: str, spec: Any, where: str) -> tuple[Any, float]:
    if isinstance(spec, str):
        spec = {"type": spec}
    if not isinstance(spec, Mapping) or "type" not in spec:
        raise ProfileError(f"{where}: expected a mapping with a 'type'")
    extra = sorted(set(spec) - {"type", "params", "weight"})
    if extra:
        raise ProfileError(f"{where}: unknown key {extra[0]!r}")
    type_name = spec["type"]
    plugin_type = PLUGINS.get(type_name)
    if plugin_type is None or plugin_type.kind != kind:
        known = sorted(n for n, p in PLUGINS.items() if p.kind == kind)
        raise ProfileError(f"{where}: unknown {kind} {type_name!r}; known: {known}")
    params = build_params(plugin_type.params_type, spec.get("params"), f"{where} ({type_name})")
    weight = spec.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, int | float) or weight < 0:
        raise ProfileError(f"{where}: weight must be a number >= 0")
    return plugin_type.factory(params), float(weight)


def load_profile(data: Mapping[str, Any]) -> Pipeline:
    """Build a pipeline from a parsed YAML profile."""
    from dgemma_gateway.routing import plugins  # noqa: F401  (registers the built-in plugins)

    if not isinstance(data, Mapping):
        raise ProfileError("a routing profile must be a mapping")
    unknown = sorted(set(data) - {"name", "filters", "scorers", "picker"})
    if unknown:
        raise ProfileError(f"unknown profile key {unknown[0]!r}")
    filters = tuple(_instantiate("filter", s, f"filters[{i}]")[0] for i, s in enumerate(data.get("filters") or []))
    scorers = tuple(
        WeightedScorer(*_instantiate("scorer", s, f"scorers[{i}]")) for i, s in enumerate(data.get("scorers") or [])
    )
    picker, _ = _instantiate("picker", data.get("picker") or {"type": "max-score"}, "picker")
    return Pipeline(str(data.get("name", "custom")), filters, scorers, picker)


PROFILES_DIR = Path(__file__).resolve().parent.parent / "profiles"
BUILTIN_PROFILES = ("latency-target", "least-loaded", "round-robin")


def load_profile_file(name_or_path: str) -> Pipeline:
    """A built-in profile by name (latency-target, least-loaded, round-robin) or a YAML file."""
    path = PROFILES_DIR / f"{name_or_path}.yaml" if name_or_path in BUILTIN_PROFILES else Path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ProfileError(f"cannot read routing profile {name_or_path!r}: {exc}") from exc
    return load_profile(data)
