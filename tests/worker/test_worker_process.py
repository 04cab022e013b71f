"""The worker as a process, configured by the operator's environment variables: port file, SIGTERM
drain with an in-flight stream that completes and exit 0, a second SIGTERM that exits at once, and SIGTERM
that ends a worker whose event loop is stuck."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from dgemma_proto.dgemma.v1 import denoiser_pb2 as pb
from dgemma_proto.dgemma.v1 import denoiser_pb2_grpc as pb_grpc
from dgemma_serve.lifetime import die_with_parent
from dgemma_worker.model import tiny_model_dir

from .conftest import text_request, wait_until

pytestmark = pytest.mark.timeout(180)


def worker_env(drain_grace_s: float) -> dict[str, str]:
    return {
        **os.environ,
        "DGEMMA_MODEL": str(tiny_model_dir()),
        "DGEMMA_HOST": "127.0.0.1",
        "DGEMMA_PORT": "0",
        "DGEMMA_METRICS_PORT": "0",
        "DGEMMA_LOG_FORMAT": "json",
        "DGEMMA_DRAIN_GRACE_S": f"{drain_grace_s:g}",
        "DGEMMA_SERVED_MODEL_NAME": "tiny-proc",
    }


@pytest.fixture
def process(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], dict[str, int], Path]]:
    port_file = tmp_path / "ports.json"
    log_file = tmp_path / "worker.log"
    with log_file.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dgemma_worker.server", "--port-file", str(port_file)],
            env=worker_env(drain_grace_s=60), stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent(),
        )
    try:
        assert wait_until(port_file.exists, timeout=60), log_file.read_text()
        ports = json.loads(port_file.read_text())
        yield proc, ports, log_file
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def _serving(channel: grpc.Channel) -> bool:
    status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
    return bool(status == health_pb2.HealthCheckResponse.SERVING)


def test_sigterm_drains_an_in_flight_stream_then_exits_zero(
    process: tuple[subprocess.Popen[bytes], dict[str, int], Path],
) -> None:
    proc, ports, log_file = process
    channel = grpc.insecure_channel(f"127.0.0.1:{ports['port']}")
    stub = pb_grpc.DenoiserStub(channel)
    assert wait_until(lambda: _serving(channel), timeout=60), log_file.read_text()
    assert stub.GetLoad(pb.GetLoadRequest()).model_name == "tiny-proc"

    params = pb.GenerationParams(max_new_tokens=160, max_denoising_steps=8, ignore_eos=True)
    stream = stub.Generate(text_request(params=params))
    assert next(stream).HasField("commit")
    proc.send_signal(signal.SIGTERM)
    assert wait_until(lambda: not _serving(channel), timeout=5)
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(text_request()))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE

    rest = list(stream)
    assert rest[-1].final.stats.completion_tokens == 160
    assert proc.wait(30) == 0
    channel.close()
    lines = [json.loads(line) for line in log_file.read_text().splitlines() if line.startswith("{")]
    requests = [line for line in lines if line.get("event") == "request"]
    assert any(r["outcome"] == "length" and r["completion_tokens"] == 160 for r in requests)
    assert all("prompt" not in r for r in requests)  # no prompt text in logs by default
    assert any(line.get("event") == "stopped" and line["drained"] for line in lines)


def test_a_second_sigterm_exits_at_once(process: tuple[subprocess.Popen[bytes], dict[str, int], Path]) -> None:
    proc, ports, log_file = process
    channel = grpc.insecure_channel(f"127.0.0.1:{ports['port']}")
    assert wait_until(lambda: _serving(channel), timeout=60), log_file.read_text()
    stream = pb_grpc.DenoiserStub(channel).Generate(
        text_request(params=pb.GenerationParams(max_new_tokens=8000, max_denoising_steps=64, ignore_eos=True))
    )
    assert next(stream).HasField("commit")
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 128 + signal.SIGTERM
    assert time.monotonic() - started < 5
    channel.close()


def _fill(pipe: int) -> None:
    """Write into the pipe until it is full, so that the next write of the process that shares it blocks."""
    os.set_blocking(pipe, False)  # the worker's end shares this flag: only while we fill (the worker is idle)
    try:
        while True:
            os.write(pipe, b"x" * 4096)
    except BlockingIOError:
        pass
    finally:
        os.set_blocking(pipe, True)


def test_sigterm_ends_a_worker_whose_event_loop_is_stuck_writing_to_a_stdout_pipe_that_nobody_reads(
    tmp_path: Path,
) -> None:
    # The reader of the worker's stdout is alive but no longer reads (a stalled log shipper, a test runner killed
    # while another process holds the pipe): the worker's next log line, "draining", blocks its event loop in
    # write(). SIGTERM used to be a callback of that loop, so it never ran and the worker lived on until SIGKILL.
    port_file = tmp_path / "ports.json"
    read_end, write_end = os.pipe()
    proc = subprocess.Popen([sys.executable, "-m", "dgemma_worker.server", "--port-file", str(port_file)],
                            env=worker_env(drain_grace_s=1), stdout=write_end, stderr=subprocess.STDOUT,
                            preexec_fn=die_with_parent())
    try:
        assert wait_until(port_file.exists, timeout=60)
        with grpc.insecure_channel(f"127.0.0.1:{json.loads(port_file.read_text())['port']}") as channel:
            assert wait_until(lambda: _serving(channel), timeout=60)
        _fill(write_end)
        proc.send_signal(signal.SIGTERM)
        # Gone by its deadline (drain grace + server.EXIT_DEADLINE_MARGIN_S), not by an orderly exit: the loop is
        # still stuck, so the deadline's exit code says which path ended it.
        assert proc.wait(60) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        os.close(read_end)
        os.close(write_end)
