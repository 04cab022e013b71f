"""Client strings cannot forge or flood log lines: request ids, KServe ids and bad values are escaped and
bounded in the worker's log (a real worker process and its log file), and request ids are bounded at the door."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from dgemma_common import logsafe
from dgemma_common.logs import JsonFormatter, TextFormatter
from dgemma_proto.dgemma.v1 import denoiser_pb2 as pb
from dgemma_proto.dgemma.v1 import denoiser_pb2_grpc as pb_grpc
from dgemma_serve.workers import LocalWorker, LocalWorkers
from dgemma_worker.model import tiny_model_dir

from .conftest import text_request, wait_until

pytestmark = pytest.mark.timeout(180)
EVIL = "ok\nFORGED 2026-01-01 INFO dgemma_worker.requests: request admin cancelled\r\x00\x1b[2J\u2028\u202e"
SMALL = pb.GenerationParams(max_new_tokens=4, max_denoising_steps=2)


@pytest.fixture(scope="module")
def proc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalWorkers, LocalWorker]]:
    workers = LocalWorkers(str(tiny_model_dir()), 1, "tiny", workdir=tmp_path_factory.mktemp("logs"))
    workers.start()
    try:
        workers.wait_bound()
        yield workers, workers.workers[0]
    finally:
        workers.stop()


def _log(w: LocalWorker) -> str:
    return w.log_path.read_text(errors="strict")


def test_control_characters_in_ids_and_values_cannot_forge_log_lines(proc: tuple[LocalWorkers, LocalWorker]) -> None:
    _, w = proc
    with grpc.insecure_channel(w.address) as channel:
        stub = pb_grpc.DenoiserStub(channel)
        assert wait_until(lambda: _ready(stub), 120)
        list(stub.Generate(text_request("Hello", SMALL, request_id=EVIL)))
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Generate(text_request("Hello", pb.GenerationParams(stop=["\n\x1b[31m" + "x" * 10_000]),
                                            request_id=EVIL)))
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT and len(info.value.details()) < 300
    client = tc.InferenceServerClient(w.address)
    text = tc.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([b"Hello"], dtype=object))
    client.infer("tiny", [text], request_id=EVIL, parameters={"max_new_tokens": 4, "max_denoising_steps": 2})
    client.close()
    assert wait_until(lambda: _log(w).count("request ok\\x0aFORGED") >= 3, 10), _log(w)[-3000:]
    log = _log(w)
    assert not any(line.startswith("FORGED") for line in log.splitlines())
    for raw in ("\x00", "\x1b", "\r", "\u2028", "\u202e"):
        assert raw not in log
    assert "\\x1b[2J" in log and "\\u202e" in log  # escaped, so still readable


@pytest.mark.parametrize("rpc", ["Generate", "ModelInfer"])
def test_a_huge_request_id_is_refused_at_the_door_and_never_floods_the_log(
        proc: tuple[LocalWorkers, LocalWorker], rpc: str) -> None:
    _, w = proc
    huge = "id-" + "x" * 100_000
    before = len(_log(w))
    if rpc == "Generate":
        with grpc.insecure_channel(w.address) as channel, pytest.raises(grpc.RpcError) as info:
            list(pb_grpc.DenoiserStub(channel).Generate(text_request("Hello", SMALL, request_id=huge)))
        code, details = info.value.code(), info.value.details()
        assert code is grpc.StatusCode.INVALID_ARGUMENT and details.startswith("request_id: at most 256")
    else:
        client = tc.InferenceServerClient(w.address)
        text = tc.InferInput("text_input", [1], "BYTES")
        text.set_data_from_numpy(np.array([b"Hello"], dtype=object))
        with pytest.raises(InferenceServerException) as kinfo:
            client.infer("tiny", [text], request_id=huge)
        client.close()
        assert kinfo.value.message().startswith("id: at most 256")
    assert wait_until(lambda: len(_log(w)) > before, 10)
    assert len(_log(w)) - before < 2000, "a 100 kB id reached the log"


def test_both_log_formats_keep_one_record_on_one_bounded_line() -> None:
    record = logging.LogRecord("dgemma_worker.requests", logging.INFO, __file__, 1, "request %s done", (EVIL,), None)
    record.fields = {"request_id": EVIL, "prompt": "p" * 1_000_000, "tokens": 3}
    for formatter in (TextFormatter(), JsonFormatter()):
        line = formatter.format(record)
        assert "\n" not in line and "\x1b" not in line and len(line) < 70_000, type(formatter).__name__
    # The gateway (and `dgemma serve`) install the same escaping on the root logger's handlers.
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        logsafe.install()
        logging.getLogger("dgemma_gateway.core").warning("request %s: retrying", EVIL)
    finally:
        root.removeHandler(handler)
    assert stream.getvalue().count("\n") == 1 and "\x1b" not in stream.getvalue()


def _ready(stub: pb_grpc.DenoiserStub) -> bool:
    return bool(stub.GetLoad(pb.GetLoadRequest(), timeout=5).ready)
