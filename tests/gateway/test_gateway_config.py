"""`dgemma gateway` flags for HTTP endpoints and overflow: a base URL is an OpenAI-compatible (vLLM) endpoint,
a host:port a worker; the endpoints file names runtimes; --overflow-* adds an external API and opts the
local variants of its model in."""

from __future__ import annotations

from pathlib import Path

import pytest

from dgemma_common.auth import ApiKeys
from dgemma_gateway.config import parse_config, parse_endpoint
from dgemma_gateway.kube import presented_key


def test_a_base_url_is_a_vllm_endpoint_and_a_host_port_a_worker() -> None:
    http = parse_endpoint("http://10.0.0.7:8000/v1/=fast:google/dg:3:500")
    assert http.kind == "http" and http.address == "http://10.0.0.7:8000/v1"
    assert http.variant.runtime == "vllm" and http.variant.cost_weight == 3 and http.variant.latency_target_ms == 500
    assert http.http is not None and http.http.model == "google/dg" and http.http.scrape
    assert http.http.server_root == "http://10.0.0.7:8000"
    worker = parse_endpoint("10.0.0.8:50051", model="m")
    assert worker.kind == "grpc" and worker.variant.runtime == "dgemma"


def test_the_endpoints_file_names_runtimes_limits_and_keys(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("\n  sk-test-123  \n")
    f = tmp_path / "endpoints.yaml"
    f.write_text(
        "variants:\n"
        "  - {name: local, model: m, allow_overflow: true, endpoints: ['127.0.0.1:50051']}\n"
        "  - {name: vllm, model: m, runtime: vllm, max_concurrency: 4, endpoints: ['http://10.0.0.7:8000/v1']}\n"
        "  - {name: hosted, model: m, runtime: external, upstream_model: google/dg, api_key_file: " + str(key) + ",\n"
        "     max_concurrency: 9, cost_weight: 5, endpoints: ['https://api.example.com/v1']}\n")
    specs = {s.variant.name: s for s in parse_config(["--endpoints-file", str(f)], env={}).endpoints}
    assert specs["local"].variant.allow_overflow and specs["local"].kind == "grpc"
    assert specs["vllm"].http is not None and specs["vllm"].http.capacity == 4 and specs["vllm"].http.scrape
    hosted = specs["hosted"].http
    assert hosted is not None and (hosted.model, hosted.api_key, hosted.capacity, hosted.max_queue) == \
        ("google/dg", "sk-test-123", 9, 0)
    assert not hosted.scrape and specs["hosted"].variant.overflow
    assert "sk-test" not in repr(specs["hosted"])  # the key never reaches a log line


def test_overflow_flags_add_an_external_variant_and_opt_the_model_in(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("sk-1\n")
    cfg = parse_config(["--endpoint", "127.0.0.1:50051=local:m", "--overflow-url", "https://api.example.com/v1",
                        "--overflow-model", "google/dg"],
                       env={"DGEMMA_OVERFLOW_API_KEY_FILE": str(key), "DGEMMA_OVERFLOW_MAX_CONCURRENCY": "3"})
    local, overflow = cfg.endpoints
    assert local.variant.allow_overflow
    assert overflow.variant.overflow and overflow.variant.model == "m" and overflow.http is not None
    assert (overflow.http.model, overflow.http.api_key, overflow.http.capacity) == ("google/dg", "sk-1", 3)
    # An overflow API alone is a valid gateway: every request goes there (the flag is the opt-in).
    alone = parse_config(["--overflow-url", "http://127.0.0.1:9/v1", "--overflow-model", "m"], env={})
    assert [s.variant.runtime for s in alone.endpoints] == ["external"]


@pytest.mark.parametrize("argv", [
    ["--endpoint", "ftp://host/v1=a:m"],
    ["--endpoint", "http://=a:m"],
    ["--overflow-url", "http://api/v1"],  # no --overflow-model
    ["--endpoint", "h:1=a:m", "--overflow-url", "http://api/v1", "--overflow-model", "x", "--overflow-cost", "0"],
])
def test_bad_endpoint_and_overflow_flags_are_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_config(argv, env={})
    assert exc.value.code == 2


def test_an_endpoints_file_runtime_must_match_its_addresses(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                            ) -> None:
    f = tmp_path / "e.yaml"
    f.write_text("variants:\n  - {name: v, model: m, runtime: vllm, endpoints: ['10.0.0.1:50051']}\n")
    with pytest.raises(SystemExit):
        parse_config(["--endpoints-file", str(f)], env={})
    assert "http(s) base URL" in capsys.readouterr().err


def test_the_worker_key_goes_to_workers_and_keyless_vllm_servers_never_to_an_external_api(tmp_path: Path) -> None:
    worker_key, own_key = tmp_path / "worker-key", tmp_path / "own-key"
    worker_key.write_text("\nwk-123\n")
    own_key.write_text("sk-own\n")
    f = tmp_path / "endpoints.yaml"
    f.write_text(
        "variants:\n"
        "  - {name: keyed, model: m, runtime: vllm, api_key_file: " + str(own_key) + ",\n"
        "     endpoints: ['http://10.0.0.8:8000/v1']}\n")
    cfg = parse_config(["--endpoint", "127.0.0.1:50051=local:m", "--endpoint", "http://10.0.0.7:8000/v1=vllm:m",
                        "--endpoints-file", str(f), "--overflow-url", "https://api.example.com/v1",
                        "--overflow-model", "google/dg"], env={"DGEMMA_WORKER_API_KEY_FILE": str(worker_key)})
    specs = {s.variant.name: s for s in cfg.endpoints}
    assert specs["local"].api_key == "wk-123"
    assert specs["vllm"].http is not None and specs["vllm"].http.api_key == "wk-123"
    assert specs["keyed"].http is not None and specs["keyed"].http.api_key == "sk-own"  # its own key stays
    assert specs["overflow"].http is not None and specs["overflow"].http.api_key is None
    assert "wk-123" not in repr(cfg)  # the key never reaches a log line


@pytest.mark.parametrize("value", ["wk-0123\n", "  wk-0123\r\n\n", "# rotating\nwk-0123\nwk-old\n",
                                   "wk-0123 no-overflow\n"])
def test_every_reader_of_a_key_file_presents_a_key_the_servers_accept(value: str, tmp_path: Path) -> None:
    """One rule for key files (dgemma_common.auth): the static flags, an endpoints file and a Secret read through
    the Kubernetes API all present the first key, which a worker's (or gateway's) keys file accepts."""
    key = tmp_path / "key"
    key.write_text(value)
    f = tmp_path / "endpoints.yaml"
    f.write_text(f"variants:\n  - {{name: own, model: m, runtime: vllm, api_key_file: {key},\n"
                 "     endpoints: ['http://10.0.0.8:8000/v1']}\n")
    cfg = parse_config(["--endpoint", "127.0.0.1:50051=local:m", "--endpoint", "http://10.0.0.7:8000/v1=vllm:m",
                        "--endpoints-file", str(f), "--overflow-url", "https://api.example.com/v1",
                        "--overflow-model", "g", "--overflow-api-key-file", str(key),
                        "--worker-api-key-file", str(key)], env={})
    presented = {s.api_key if s.http is None else s.http.api_key for s in cfg.endpoints}
    assert presented == {presented_key(value)} == {"wk-0123"}
    ApiKeys(key).check({"x-api-key": "wk-0123"}.get)
