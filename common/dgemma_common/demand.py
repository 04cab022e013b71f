"""The demand snapshot: what a gateway measured per variant, read by the operator's autoscaler.

The gateway builds it (`dgemma_gateway.demand.snapshot`) and serves it as JSON at `GET /v1/dgemma/demand`;
the operator reads every gateway replica's, parses each strictly (`parse_snapshot`) and merges them
(`merge_views`). The models are the contract:

- `version` says which contract a snapshot follows. A reader refuses any other version: renaming, removing or
  changing the meaning of a field needs a new version; adding a field does not (readers ignore fields they do
  not know).
- Every field is required and typed (no defaults, no coercion: `"1.5"` is not a number, `true` is not 1), so a
  renamed or missing key is an error naming it, never a zero that would make an autoscaler scale down.
- Each field says how the views of several gateway replicas combine (`Merge`), next to its meaning.

Versions:

- 2: every `*canvases*` field of `Demand` counts the canvases requests are *expected to run* (E[min(allowed,
  reply length)], from the variant's finished replies; all that max_tokens allows until replies have been
  seen), the unit `Capacity` is measured in. Version 1 counted all the canvases max_tokens allows, so with
  replies that end early (the bundled trained model's used 56-58% of them) the autoscaler compared an
  over-counted demand with a capacity in canvases really run and over-provisioned by that ratio.
  Added with it: `Capacity.step_latency_s` / `encoder_latency_s` and `VariantView.step_shares`.
- 1: the first contract.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Annotated, Any, TypeVar

import pydantic
from pydantic import BaseModel, ConfigDict, computed_field

VERSION = 2


class Merge(enum.Enum):
    """How the views of several gateway replicas combine into the fleet's."""

    SUM = "sum"  # each replica measures the requests it routed: the fleet's is the sum
    MAX = "max"  # from the workers' own reports, which every replica sees alike: counted once
    SAME = "same"  # a property of the variant: the first view's
    EACH = "each"  # a group of fields: merged field by field
    MOST_MEASURED = "most-measured"  # capacity: the view that measured the most replicas
    MEAN = "mean"  # learned by each replica from the requests it saw: per key, the mean of the views that have it


class _Contract(BaseModel):
    model_config = ConfigDict(frozen=True, strict=True, extra="ignore", allow_inf_nan=False)


Rate = Annotated[float, pydantic.Field(ge=0)]


class Demand(_Contract):
    """What a variant is asked for. Attributed (see the gateway's attribution.py): what it is preferred for
    plus the overflow it takes in; the autoscaler scales on these. Rates are per second over the window.

    Canvases (every `*canvases*` field) are those the requests are expected to run: per request E[min(canvases
    max_tokens allows, reply length)], the reply length learned from the variant's finished replies (every
    allowed canvas until some have finished). Tokens are max_tokens as asked."""

    requests_per_s: Annotated[Rate, Merge.SUM]
    tokens_per_s: Annotated[Rate, Merge.SUM]  # max_tokens asked for
    canvases_per_s: Annotated[Rate, Merge.SUM]  # expected to run (see above), in capacity's unit
    preferred_requests_per_s: Annotated[Rate, Merge.SUM]
    preferred_tokens_per_s: Annotated[Rate, Merge.SUM]
    preferred_canvases_per_s: Annotated[Rate, Merge.SUM]
    overflow_in_canvases_per_s: Annotated[Rate, Merge.SUM]
    # What was routed to the variant, whatever its preference.
    routed_requests_per_s: Annotated[Rate, Merge.SUM]
    routed_tokens_per_s: Annotated[Rate, Merge.SUM]
    routed_canvases_per_s: Annotated[Rate, Merge.SUM]
    # Queued at the variant's workers (their reports, or this gateway's own count past their capacity).
    requests_waiting: Annotated[int, pydantic.Field(ge=0), Merge.MAX]
    canvases_waiting: Annotated[Rate, Merge.MAX]
    requests_in_flight: Annotated[int, pydantic.Field(ge=0), Merge.SUM]
    # Latency targets in the window, and since the gateway started.
    targets_met: Annotated[int, pydantic.Field(ge=0), Merge.SUM]
    targets_missed: Annotated[int, pydantic.Field(ge=0), Merge.SUM]
    requests_total: Annotated[int, pydantic.Field(ge=0), Merge.SUM]
    targets_met_total: Annotated[int, pydantic.Field(ge=0), Merge.SUM]
    targets_missed_total: Annotated[int, pydantic.Field(ge=0), Merge.SUM]
    # Held at the gateway while the variant has no ready replica (scale from zero): waiting the workers cannot see.
    requests_held: Annotated[int, pydantic.Field(ge=0), Merge.SUM]
    canvases_held: Annotated[Rate, Merge.SUM]

    @computed_field  # type: ignore[prop-decorator]
    @property
    def target_miss_ratio(self) -> float:
        """Share of the window's latency targets missed (0 without any)."""
        seen = self.targets_met + self.targets_missed
        return self.targets_missed / seen if seen else 0.0


class Delivered(_Contract):
    """What the variant's ready replicas deliver."""

    tokens_per_s: Annotated[Rate, Merge.MAX]  # the workers' own reports, summed over ready replicas
    tokens_per_s_per_replica: Annotated[Rate, Merge.MAX]
    completion_tokens_per_s: Annotated[Rate, Merge.SUM]  # finished at this gateway
    canvases_per_s_per_replica: Annotated[Rate, Merge.SUM]


class Capacity(_Contract):
    """What one ready replica can finish, from the workers' step timings; None until one has measured."""

    canvases_per_s_per_replica: Annotated[float | None, pydantic.Field(gt=0)]
    tokens_per_s_per_replica: Annotated[float | None, pydantic.Field(gt=0)]
    steps_per_canvas: Annotated[float | None, pydantic.Field(gt=0)]
    # The measured latencies capacity was computed from (means over the replicas that measured).
    step_latency_s: Annotated[float | None, pydantic.Field(gt=0)]
    encoder_latency_s: Annotated[float | None, pydantic.Field(ge=0)]
    replicas_measured: Annotated[int, pydantic.Field(ge=0)]
    # What a step cost the replicas: their busy time per step (the step plus the work between steps), or the
    # step latency where an endpoint reports no busy time. Absent from a gateway older than this field.
    step_cost_s: Annotated[float | None, pydantic.Field(gt=0)] = None


class VariantView(_Contract):
    """One variant as one gateway (or, merged, the gateway fleet) sees it."""

    model: Annotated[str, Merge.SAME]
    gpu_profile: Annotated[str, Merge.SAME]
    cost_weight: Annotated[float, Merge.SAME]
    latency_target_ms: Annotated[float, Merge.SAME]
    canvas_length: Annotated[int, pydantic.Field(gt=0), Merge.SAME]
    tokens_per_s_prior: Annotated[float, Merge.SAME]
    replicas: Annotated[int, pydantic.Field(ge=0), Merge.MAX]  # endpoints known
    replicas_ready: Annotated[int, pydantic.Field(ge=0), Merge.MAX]
    demand: Annotated[Demand, Merge.EACH]
    delivered: Annotated[Delivered, Merge.EACH]
    capacity: Annotated[Capacity, Merge.MOST_MEASURED]
    # Learned from finished requests: the share of the step cap a canvas takes (adaptive stopping), per step
    # cap (its decimal string: JSON object keys are strings).
    step_shares: Annotated[dict[str, Annotated[float, pydantic.Field(gt=0, le=1)]], Merge.MEAN]
    gateways: Annotated[int, pydantic.Field(ge=1), Merge.SUM]  # gateway replicas whose views this is


class DemandSnapshot(_Contract):
    """One gateway's measurements of every variant it knows."""

    version: int
    time_unix_s: float
    window_s: Annotated[float, pydantic.Field(gt=0)]
    variants: dict[str, VariantView]
    unroutable: dict[str, Annotated[int, pydantic.Field(ge=0)]]  # per model: requests no endpoint could take


class SnapshotError(ValueError):
    """A demand snapshot this reader cannot use: another version, or a field missing or of the wrong type."""


def parse_snapshot(data: Any) -> DemandSnapshot:
    """A snapshot as JSON-decoded data, checked against this version of the contract."""
    if not isinstance(data, dict):
        raise SnapshotError(f"is not a JSON object but {type(data).__name__}")
    if data.get("version") != VERSION:
        got = f"version {data['version']!r}" if "version" in data else "no version"
        raise SnapshotError(f"has {got}; this reader knows version {VERSION}")
    try:
        return DemandSnapshot.model_validate(data)
    except pydantic.ValidationError as e:
        problems = [f"{'.'.join(map(str, err['loc']))}: {err['msg'].lower()}" for err in e.errors()]
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise SnapshotError("; ".join(problems[:3]) + more) from None


M = TypeVar("M", bound=_Contract)


def _merge(cls: type[M], views: Sequence[M]) -> M:
    merged: dict[str, Any] = {}
    for name, info in cls.model_fields.items():
        rule = next(m for m in info.metadata if isinstance(m, Merge))
        values = [getattr(v, name) for v in views]
        if rule is Merge.SUM:
            merged[name] = sum(values)
        elif rule is Merge.MAX:
            merged[name] = max(values)
        elif rule is Merge.SAME:
            merged[name] = values[0]
        elif rule is Merge.EACH:
            merged[name] = _merge(type(values[0]), values)
        elif rule is Merge.MEAN:
            merged[name] = _mean_by_key(values)
        else:  # MOST_MEASURED
            merged[name] = max(values, key=lambda c: c.replicas_measured)
    return cls.model_validate(merged)


def _mean_by_key(learned: Sequence[dict[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key in sorted({key for one in learned for key in one}, key=lambda k: (len(k), k)):  # "8" before "16"
        have = [one[key] for one in learned if key in one]
        out[key] = sum(have) / len(have)
    return out


def merge_views(views: Sequence[VariantView]) -> VariantView:
    """One variant as the whole gateway fleet sees it, from each gateway replica's view of it."""
    if not views:
        raise ValueError("no views to merge")
    return _merge(VariantView, views)
