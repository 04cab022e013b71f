"""`dgemma serve` stops without cutting streams: SIGTERM lets in-flight requests finish within --drain-grace-s,
and local scale-down retires only idle workers."""

from __future__ import annotations

import queue
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as tc
from openai import OpenAI

from dgemma_serve.autoscale import retirable
from dgemma_serve.workers import LocalWorker
from dgemma_worker.model import tiny_model_dir
from tests.stack import DgemmaProcess

pytestmark = pytest.mark.timeout(240)


def _kserve_stream(address: str, results: queue.Queue[Any]) -> tc.InferenceServerClient:
    client = tc.InferenceServerClient(address)
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    text = tc.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([b"hi"], dtype=object))
    client.async_stream_infer("tiny-diffusiongemma", [text], parameters={
        "max_new_tokens": 160, "max_denoising_steps": 16, "ignore_eos": True})
    return client


def test_sigterm_lets_http_and_kserve_streams_longer_than_the_old_grace_finish() -> None:
    # 0.05 s per step (a slow GPU), 16 steps per canvas of 16 tokens, 160 tokens: ~8 s streams, one over HTTP and
    # one over KServe gRPC, both in flight when `dgemma serve` gets SIGTERM. Before --drain-grace-s the gateway's
    # gRPC front stopped with a 2 s grace and the workers with 5 s.
    p = DgemmaProcess(["serve", "--port", "0", "--grpc-port", "0", "--model", str(tiny_model_dir()),
                       "--served-model-name", "tiny-diffusiongemma", "--drain-grace-s", "60", "--max-active", "2"],
                      env={"DGEMMA_DEBUG_STEP_DELAY_S": "0.05"})
    try:
        url = p.serving(150)
        results: queue.Queue[Any] = queue.Queue()
        kserve = _kserve_stream(p.kserve_address(), results)
        client = OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
        stream = client.chat.completions.create(
            model="tiny-diffusiongemma", max_tokens=160, stream=True, messages=[{"role": "user", "content": "hi"}],
            extra_body={"max_denoising_steps": 16, "ignore_eos": True})
        chunks = iter(stream)
        first = next(chunks)
        started = time.monotonic()
        p.proc.send_signal(signal.SIGTERM)
        rest = list(chunks)
        assert time.monotonic() - started > 5.0, "the stream was not long enough to show the old 5 s cut"
        finishes = [c.choices[0].finish_reason for c in [first, *rest] if c.choices and c.choices[0].finish_reason]
        assert finishes == ["length"]
        canvases = 0
        while True:
            result, error = results.get(timeout=60)
            assert error is None, error
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
            canvases += 1
        assert canvases == 10
        kserve.stop_stream()
        kserve.close()
        assert p.proc.wait(60) == 0
    finally:
        p.kill()


def _worker(index: int) -> LocalWorker:
    return LocalWorker(index, None, Path("p"), Path("l"))  # type: ignore[arg-type]


def test_scale_down_retires_only_idle_workers_newest_first() -> None:
    live = [_worker(0), _worker(1), _worker(2), _worker(3)]
    busy = {1, 3}
    chosen = retirable(live, 2, lambda w: w.index in busy)
    assert [w.index for w in chosen] == [2, 0]
    assert retirable(live, 2, lambda w: True) == []  # all busy: nobody now; the next decision tries again
