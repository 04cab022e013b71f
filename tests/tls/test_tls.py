"""TLS with real certificates made here: the gateway serves HTTPS and gRPC over TLS, speaks mutual TLS to a
worker process that refuses clients without a certificate from its CA, and new connections get renewed
certificates without a restart. Clients are the real ones: the OpenAI SDK (httpx with a CA bundle),
tritonclient with ssl=True, grpcio and the ssl module."""

from __future__ import annotations

import json
import os
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx2
import openai
import pytest
import tritonclient.grpc as tc
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from dgemma_common.tls import TlsFiles
from dgemma_gateway.config import parse_config
from dgemma_gateway.endpoints import WorkerTls
from dgemma_proto.dgemma.v1 import denoiser_pb2 as pb
from dgemma_proto.dgemma.v1 import denoiser_pb2_grpc as pb_grpc
from dgemma_serve.workers import LocalWorkers
from dgemma_worker.model import tiny_model_dir
from dgemma_worker.worker_config import parse_config as parse_worker_config
from tests.gateway.gateway_harness import MODEL, RunningGateway, kserve_inputs, static, variant
from tests.tls.certs import CA, Issued

pytestmark = pytest.mark.timeout(180)

WORKER_NAME = "dgemma-worker"  # what the workers' certificate names (not their addresses), as the chart issues it


@dataclass
class Pki:
    ca: CA
    gateway: Issued  # the front door's serving certificate
    worker: Issued  # the worker's serving certificate (names WORKER_NAME only)
    client: Issued  # the gateway's client certificate for the workers
    stranger: Issued  # a client certificate from another CA


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    ca = CA(root / "ca")
    other = CA(root / "other", "someone else's CA")
    return Pki(ca, ca.issue("gateway"), ca.issue("worker", dns=(WORKER_NAME,), ips=()),
               ca.issue("gateway-client", dns=(), ips=(), client=True),
               other.issue("stranger", dns=(), ips=(), client=True))


@pytest.fixture(scope="module")
def worker(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalWorkers]:
    """A `dgemma worker` process serving mutual TLS, with a plaintext health-only port for probes."""
    tls = ["--tls-cert-file", str(pki.worker.cert), "--tls-key-file", str(pki.worker.key),
           "--tls-client-ca-file", str(pki.worker.ca), "--health-port", "0"]
    with LocalWorkers(str(tiny_model_dir()), 1, MODEL, tls, workdir=tmp_path_factory.mktemp("worker")).running(5) as w:
        yield w


@pytest.fixture(scope="module")
def gateway(pki: Pki, worker: LocalWorkers) -> Iterator[RunningGateway]:
    """HTTPS and gRPC over TLS in front, mutual TLS to the worker; certificates looked at every 0.2 s."""
    worker_tls = WorkerTls(pki.client.ca, TlsFiles(pki.client.cert, pki.client.key), WORKER_NAME)
    g = RunningGateway([static((worker.workers[0].address, variant("cpu")))], grpc=True,
                       tls=TlsFiles(pki.gateway.cert, pki.gateway.key), worker_tls=worker_tls, tls_reload_s=0.2)
    try:
        g.wait_ready(1)
        yield g
    finally:
        g.close()


def _health(channel: grpc.Channel) -> Any:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)


def test_the_openai_sdk_streams_over_https_through_mutual_tls_to_the_worker(gateway: RunningGateway,
                                                                            pki: Pki) -> None:
    assert gateway.url.startswith("https://")
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=60,
                           http_client=httpx2.Client(verify=ssl.create_default_context(cafile=str(pki.ca.path))))
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=24,
                                            stream=True, extra_body={"max_denoising_steps": 2, "ignore_eos": True})
    chunks = list(stream)
    assert chunks[-1].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_a_client_that_does_not_trust_the_ca_or_speaks_plain_http_gets_no_answer(gateway: RunningGateway) -> None:
    untrusting = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=10)
    with pytest.raises(openai.APIConnectionError):
        untrusting.models.list()
    plain = openai.OpenAI(base_url=gateway.url.replace("https://", "http://") + "/v1", api_key="unused",
                          max_retries=0, timeout=10)
    with pytest.raises((openai.APIConnectionError, openai.APIStatusError)):
        plain.models.list()


def test_tritonclient_with_ssl_infers_through_the_gateways_tls_grpc_port(gateway: RunningGateway, pki: Pki) -> None:
    client = tc.InferenceServerClient(gateway.grpc_address, ssl=True, root_certificates=str(pki.ca.path))
    settings = {"max_tokens": 16, "max_denoising_steps": 2, "ignore_eos": True}
    result = client.infer(MODEL, kserve_inputs("Hello", settings))
    assert len(result.as_numpy("output_ids")) == 16
    client.close()
    plaintext = tc.InferenceServerClient(gateway.grpc_address)
    with pytest.raises(InferenceServerException):
        plaintext.is_server_live(client_timeout=5)
    plaintext.close()


def test_the_worker_refuses_clients_without_a_certificate_from_its_ca(worker: LocalWorkers, pki: Pki) -> None:
    address = worker.workers[0].address
    name = [("grpc.ssl_target_name_override", WORKER_NAME)]
    ca = pki.ca.pem

    def creds(client: Issued | None) -> grpc.ChannelCredentials:
        if client is None:
            return grpc.ssl_channel_credentials(root_certificates=ca)
        return grpc.ssl_channel_credentials(ca, client.key_pem, client.cert_pem)

    refused = [grpc.insecure_channel(address), grpc.secure_channel(address, creds(None), options=name),
               grpc.secure_channel(address, creds(pki.stranger), options=name)]
    for channel in refused:
        with channel, pytest.raises(grpc.RpcError) as err:
            pb_grpc.DenoiserStub(channel).Tokenize(pb.TokenizeRequest(prompt=pb.Prompt(text="hi")), timeout=10)
        assert err.value.code() is grpc.StatusCode.UNAVAILABLE
    with grpc.secure_channel(address, creds(pki.client), options=name) as channel:
        reply = pb_grpc.DenoiserStub(channel).Tokenize(pb.TokenizeRequest(prompt=pb.Prompt(text="hi")), timeout=10)
        assert len(reply.token_ids) > 0


def test_the_plaintext_health_port_answers_probes_and_nothing_else(worker: LocalWorkers,
                                                                   gateway: RunningGateway) -> None:
    ports = json.loads(worker.workers[0].port_file.read_text())
    with grpc.insecure_channel(f"127.0.0.1:{ports['health_port']}") as channel:
        assert _health(channel).status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.DenoiserStub(channel).Tokenize(pb.TokenizeRequest(prompt=pb.Prompt(text="hi")), timeout=10)
        assert err.value.code() is grpc.StatusCode.UNIMPLEMENTED


def _served_serial(port: int, ca: Path, alpn: str | None = None) -> int:
    ctx = ssl.create_default_context(cafile=str(ca))
    if alpn:
        ctx.set_alpn_protocols([alpn])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def _rotate(old: Issued, new: Issued) -> None:
    """What the kubelet does when cert-manager renews a Secret, one file after the other."""
    for name in ("tls.crt", "tls.key"):
        tmp = old.folder / f".{name}.new"
        tmp.write_bytes((new.folder / name).read_bytes())
        os.replace(tmp, old.folder / name)


def _eventually(check: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_renewed_serving_certificates_are_served_to_new_connections_without_a_restart(
    gateway: RunningGateway, worker: LocalWorkers, pki: Pki, tmp_path: Path
) -> None:
    https_port, grpc_port = gateway.server.port, gateway.server.grpc_port
    assert _served_serial(https_port, pki.ca.path) == pki.gateway.serial
    assert _served_serial(grpc_port, pki.ca.path, "h2") == pki.gateway.serial
    renewed = pki.ca.issue("gateway-renewed")
    _rotate(pki.gateway, renewed)
    _eventually(lambda: _served_serial(https_port, pki.ca.path) == renewed.serial)
    assert _served_serial(grpc_port, pki.ca.path, "h2") == renewed.serial
    # The worker's certificate, too; and the gateway still reaches it over mutual TLS.
    worker_renewed = pki.ca.issue("worker-renewed", dns=(WORKER_NAME,), ips=())
    _rotate(pki.worker, worker_renewed)
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=60,
                           http_client=httpx2.Client(verify=ssl.create_default_context(cafile=str(pki.ca.path))))
    reply = client.completions.create(model=MODEL, prompt="Hello", max_tokens=8,
                                      extra_body={"max_denoising_steps": 2})
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_tls_flags_and_environment_variables_configure_the_gateway_and_the_worker(tmp_path: Path) -> None:
    env = {"DGEMMA_TLS_CERT_FILE": "/tls/tls.crt", "DGEMMA_TLS_KEY_FILE": "/tls/tls.key",
           "DGEMMA_WORKER_TLS_CA_FILE": "/client/ca.crt", "DGEMMA_WORKER_TLS_CERT_FILE": "/client/tls.crt",
           "DGEMMA_WORKER_TLS_KEY_FILE": "/client/tls.key", "DGEMMA_WORKER_TLS_SERVER_NAME": WORKER_NAME}
    cfg = parse_config(["--endpoint", "w:1=v:m"], env)
    assert cfg.tls == TlsFiles(Path("/tls/tls.crt"), Path("/tls/tls.key"))
    assert cfg.worker_tls == WorkerTls(Path("/client/ca.crt"), TlsFiles(Path("/client/tls.crt"),
                                                                         Path("/client/tls.key")), WORKER_NAME)
    with pytest.raises(SystemExit):
        parse_config(["--endpoint", "w:1=v:m", "--tls-cert-file", "/tls/tls.crt"], {})
    with pytest.raises(SystemExit):
        parse_config(["--endpoint", "w:1=v:m", "--worker-tls-cert-file", "a", "--worker-tls-key-file", "b"], {})
    worker = parse_worker_config(["--model", "m"], {"DGEMMA_TLS_CERT_FILE": "/w/tls.crt",
                                                    "DGEMMA_TLS_KEY_FILE": "/w/tls.key",
                                                    "DGEMMA_TLS_CLIENT_CA_FILE": "/w/ca.crt",
                                                    "DGEMMA_HEALTH_PORT": "50052"})
    assert worker.tls == TlsFiles(Path("/w/tls.crt"), Path("/w/tls.key"), Path("/w/ca.crt"))
    assert worker.health_port == 50052
    with pytest.raises(SystemExit):
        parse_worker_config(["--model", "m", "--tls-client-ca-file", "/w/ca.crt"], {})
