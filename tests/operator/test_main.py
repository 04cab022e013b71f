"""`dgemma operator` turns its command line into kopf's run options."""

from __future__ import annotations

import pytest

from dgemma_operator.main import kopf_options, parser


def options(*argv: str) -> dict[str, object]:
    return kopf_options(parser().parse_args(list(argv)))


def test_defaults_watch_the_cluster_with_liveness_on_8080() -> None:
    assert options() == {
        "standalone": False,
        "priority": 0,
        "clusterwide": True,
        "namespaces": [],
        "liveness_endpoint": "http://0.0.0.0:8080/healthz",
    }


def test_namespaces_are_repeatable_and_make_it_namespaced() -> None:
    opts = options("--namespace", "a", "--namespace", "b", "--standalone", "--liveness-port", "0")
    assert opts == {"standalone": True, "priority": 0, "clusterwide": False, "namespaces": ["a", "b"]}


def test_peering_names_the_kopf_peering_object() -> None:
    assert options("--all-namespaces", "--peering", "dgemma")["peering_name"] == "dgemma"


@pytest.mark.parametrize(
    "argv", [["--all-namespaces", "--namespace", "a"], ["--standalone", "--peering", "x"]]
)
def test_contradictory_options_are_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        parser().parse_args(argv)


def test_autoscaler_flags_reach_the_handlers_through_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from dgemma_operator import settings
    from dgemma_operator.main import export_settings

    monkeypatch.delenv(settings.GATEWAY_URL_ENV, raising=False)
    monkeypatch.setenv("POD_NAMESPACE", "ops")
    assert settings.from_environment().demand_url == "http://dgemma-gateway.ops.svc:8000/v1/dgemma/demand"
    monkeypatch.setenv(settings.AUTOSCALE_INTERVAL_ENV, "15")
    export_settings(parser().parse_args(["--gateway-url", "http://gw:8000/", "--autoscale-interval-s", "2"]))
    current = settings.from_environment()
    assert (current.demand_url, current.autoscale_interval_s) == ("http://gw:8000/v1/dgemma/demand", 2.0)
