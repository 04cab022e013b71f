"""The gateway presents the workers' API key: `dgemma gateway --worker-api-key-file` in front of a `dgemma worker`
that requires a key serves the OpenAI SDK and tritonclient without the worker counting one refusal; without the key
file, the worker refuses the gateway and clients get a clear 502 / UNAVAILABLE naming the cause, not a 500. A key
that arrives later or changes (a Kubernetes Secret read again) is used from the next call on."""

from __future__ import annotations

import json
import os
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import openai
import pytest
import tritonclient.grpc as tc
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from dgemma_common.auth import ApiKeys, AuthError
from dgemma_gateway.endpoints import EndpointSpec, StaticSource
from dgemma_serve.workers import LocalWorker, LocalWorkers
from dgemma_worker.model import tiny_model_dir
from tests.gateway.gateway_harness import MODEL, RunningGateway, kserve_inputs, variant
from tests.stack import GatewayProcess

pytestmark = pytest.mark.timeout(240)
KEY = "wk-gateway-test-0123456789"
SMALL = {"max_denoising_steps": 2, "ignore_eos": True}


@pytest.fixture(scope="module")
def workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalWorkers]:
    """One `dgemma worker` process that requires KEY (with its metrics port, to read its refusals)."""
    with LocalWorkers(str(tiny_model_dir()), 1, MODEL, ["--metrics-port", "0"], api_key=KEY,
                      workdir=tmp_path_factory.mktemp("keyed")).running(10) as w:
        yield w


def _refused_calls(worker: LocalWorker) -> float:
    """Calls the worker refused for their key, over both services (its metrics)."""
    port = json.loads(worker.port_file.read_text())["metrics_port"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == "dgemma_worker_auth_failures_total")


def _gateway(workdir: Path, worker: LocalWorker, *args: str) -> GatewayProcess:
    return GatewayProcess(workdir, [worker.address], MODEL, args)


def test_a_gateway_with_the_workers_key_serves_the_sdk_and_tritonclient(
        workers: LocalWorkers, tmp_path: Path) -> None:
    key_file = tmp_path / "worker-key"
    key_file.write_text(f"{KEY}\n")
    worker = workers.workers[0]
    before = _refused_calls(worker)
    gateway = _gateway(tmp_path, worker, "--worker-api-key-file", str(key_file))
    try:
        gateway.wait_ready()  # its load watch (WatchLoad) was let in
        sdk = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=120)
        reply = sdk.chat.completions.create(model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "Hi"}],
                                            extra_body=SMALL)
        assert reply.usage is not None and reply.usage.completion_tokens == 8
        chunks = list(sdk.completions.create(model=MODEL, prompt="Hi", max_tokens=8, stream=True, extra_body=SMALL))
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8
        client = tc.InferenceServerClient(gateway.grpc_address)
        result = client.infer(MODEL, kserve_inputs("Hi", {"max_tokens": 8, **SMALL}))
        assert len(result.as_numpy("output_ids")) == 8
        client.close()
    finally:
        gateway.stop()
    assert _refused_calls(worker) == before, gateway.log_tail()


def test_without_the_key_the_worker_refuses_the_gateway_and_clients_get_a_clear_error(
        workers: LocalWorkers, tmp_path: Path) -> None:
    worker = workers.workers[0]
    before = _refused_calls(worker)
    gateway = _gateway(tmp_path, worker)
    try:
        sdk = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=60)

        def status() -> openai.APIStatusError:
            with pytest.raises(openai.APIStatusError) as info:
                sdk.chat.completions.create(model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "Hi"}])
            return info.value

        # The gateway's first load watch is refused within moments of its start; until then it has no answer yet.
        error = status()
        for _ in range(100):
            if error.status_code == 502:
                break
            error = status()
        assert error.status_code == 502, error
        assert error.code == "upstream_misconfigured"
        assert "refuse the gateway's API key" in error.message and "missing API key" in error.message
        assert "--worker-api-key-file" in error.message
        client = tc.InferenceServerClient(gateway.grpc_address)
        with pytest.raises(InferenceServerException) as kserve:
            client.infer(MODEL, kserve_inputs("Hi", {"max_tokens": 8, **SMALL}))
        assert kserve.value.status() == "StatusCode.UNAVAILABLE", kserve.value
        assert "refuse the gateway's API key" in (kserve.value.message() or "")
        client.close()
        assert not gateway.ready()
        assert "refuses the gateway's calls" in gateway.log_tail(200)
    finally:
        gateway.stop()
    assert _refused_calls(worker) > before


def test_a_key_given_later_or_rotated_in_place_is_used_from_the_next_call(workers: LocalWorkers) -> None:
    worker = workers.workers[0]
    spec = EndpointSpec(f"cpu/{worker.address}", worker.address, variant("cpu"))
    source = StaticSource([spec])
    gw = RunningGateway([source])
    sdk = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0, timeout=120)

    def apply(key: str) -> None:
        async def on_loop() -> None:  # what a source does when a Secret it read changed
            gw.gateway.registry.apply(source.name, [replace(spec, api_key=key)])
        gw.call(on_loop())

    def ask() -> int:
        try:
            sdk.chat.completions.create(model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "Hi"}],
                                        extra_body=SMALL)
        except openai.APIStatusError as err:
            return err.status_code
        return 200

    try:
        deadline = time.monotonic() + 30
        while gw.gateway.registry.key_refused(MODEL) is None:  # no key yet: its load watch is refused
            assert time.monotonic() < deadline
            time.sleep(0.05)
        apply(KEY)  # the key arrives: the endpoint's channel is opened again, with it
        gw.wait_ready(1, timeout=30)
        assert ask() == 200
        apply("wk-rotated-elsewhere")  # the same endpoint, another key: the very next call carries it
        assert ask() == 502
        apply(KEY)
        deadline = time.monotonic() + 30
        while ask() != 200:  # once the ejection after the refusal (1 s) is over
            assert time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        gw.close()


def secret_volume(folder: Path, name: str, value: str, version: int) -> None:
    """A Secret volume as the kubelet writes it: the data in a fresh timestamped folder, `..data` swapped to it in
    one rename, and `name` a link through `..data` (what the gateway's flag names)."""
    data = folder / f"..2026_01_01_00_00_0{version}"
    data.mkdir()
    (data / name).write_text(value)
    old = folder / "..data"
    if old.exists():
        # The same modification time as the file it replaces: a rotation within one tick of a coarse clock.
        stat = (old / name).stat()
        os.utime(data / name, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    (folder / "..data_tmp").symlink_to(data.name)
    os.replace(folder / "..data_tmp", old)
    if not (folder / name).is_symlink():
        (folder / name).symlink_to(f"..data/{name}")


def test_a_rotated_worker_key_secret_is_taken_without_a_restart(workers: LocalWorkers, tmp_path: Path) -> None:
    """`--worker-api-key-file` is read again when the kubelet swaps the mounted Secret: a gateway started with a key
    the worker no longer takes serves again once the Secret holds the workers' key."""
    volume = tmp_path / "worker-api-key"
    volume.mkdir()
    secret_volume(volume, "key", "wk-before-the-rotation\n", 1)
    gateway = _gateway(tmp_path, workers.workers[0], "--worker-api-key-file", str(volume / "key"))
    try:
        deadline = time.monotonic() + 60
        while "refuses the gateway's calls" not in gateway.log_tail(200):
            assert time.monotonic() < deadline, gateway.log_tail()
            time.sleep(0.1)
        assert not gateway.ready()
        secret_volume(volume, "key", f"# rotated\n{KEY}\n", 2)
        gateway.wait_ready(60)  # no restart: its load watch was let in with the new key
        sdk = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=120)
        reply = sdk.chat.completions.create(model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "Hi"}],
                                            extra_body=SMALL)
        assert reply.usage is not None and reply.usage.completion_tokens == 8
    finally:
        gateway.stop()


def test_keys_files_are_read_again_after_a_swap_within_one_clock_tick(tmp_path: Path) -> None:
    """The servers' keys (the gateway's clients', a worker's) follow the same swap: a new file is a new inode."""
    secret_volume(tmp_path, "keys", "k-old\n", 1)
    keys = ApiKeys(tmp_path / "keys", recheck_s=0)
    keys.check({"x-api-key": "k-old"}.get)
    secret_volume(tmp_path, "keys", "k-new\n", 2)
    keys.check({"x-api-key": "k-new"}.get)
    with pytest.raises(AuthError):
        keys.check({"x-api-key": "k-old"}.get)
