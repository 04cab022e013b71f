"""What every component's Prometheus metrics share: how each metric adds up across replicas, the standard
process collectors, and constant labels.

A dashboard or alert that aggregates a metric across replicas must use the aggregation its kind allows:
summing a value that every gateway replica reports for the same fleet multiplies it by the replica count.
Each component's metrics module declares the kind of every metric it exports (`KINDS`); tests/deploy
check every dashboard and rule query against those declarations.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Mapping

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.core import Metric
from prometheus_client.registry import Collector


class Kind(enum.Enum):
    """How a metric's values from several replicas combine into one number for the fleet."""

    # Counters and histograms (per replica): the fleet's rate is the sum of the replicas' rates.
    COUNTER = "counter"
    # A gauge of this replica's own share (its queue, the demand it routed): the fleet's value is the sum.
    SHARE = "share"
    # A gauge every replica reports alike for the same fleet (endpoints seen, workers' queues as reported
    # to each gateway): one replica's value is the fleet's; a sum over N replicas reads N times too high.
    FLEET = "fleet"
    # A per-replica ratio, average or setting: never summed; max, min or avg across replicas.
    LEVEL = "level"


# The aggregation operators that give the right number for each kind when several replicas are scraped.
ALLOWED_AGGREGATIONS: Mapping[Kind, frozenset[str]] = {
    Kind.COUNTER: frozenset({"sum"}),
    Kind.SHARE: frozenset({"sum"}),
    Kind.FLEET: frozenset({"max", "min"}),
    Kind.LEVEL: frozenset({"max", "min", "avg"}),
}


def add_standard_collectors(registry: CollectorRegistry) -> CollectorRegistry:
    """Register the process_* and python_* collectors that prometheus_client puts on its global registry."""
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


class ConstantLabels(Collector):
    """Every metric of an inner registry, each sample with the same extra labels (e.g. the variant served)."""

    def __init__(self, inner: CollectorRegistry, labels: Mapping[str, str]) -> None:
        self._inner = inner
        self._labels = dict(labels)

    def collect(self) -> Iterator[Metric]:
        for metric in self._inner.collect():
            out = Metric(metric.name, metric.documentation, metric.type, metric.unit)
            out.samples = [s._replace(labels={**s.labels, **self._labels}) for s in metric.samples]
            yield out
