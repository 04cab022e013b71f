"""tritonclient against the gateway's KServe front, and `dgemma serve --demo` end to end."""

from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from dgemma_serve.lifetime import die_with_parent
from dgemma_serve.serve import checkpoint_shape
from dgemma_worker.checkpoints import BUNDLED_MODEL_DIR
from tests.gateway.gateway_harness import MODEL, RunningGateway, fast_gateway, kserve_inputs
from tests.procmem import peak_rss_growth

pytestmark = pytest.mark.timeout(180)


gw = pytest.fixture(scope="module", name="gw")(fast_gateway)


def test_tritonclient_infers_through_the_gateway(gw: RunningGateway) -> None:
    client = tc.InferenceServerClient(gw.grpc_address)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL)
    assert client.get_model_metadata(MODEL).name == MODEL
    settings = {"max_tokens": 20, "max_denoising_steps": 2, "ignore_eos": True}
    result = client.infer(MODEL, kserve_inputs("Hello", settings))
    assert len(result.as_numpy("output_ids")) == 20
    assert result.as_numpy("stop_reason")[0] == b"length"
    with pytest.raises(InferenceServerException, match="unknown model"):
        client.infer("nope", kserve_inputs("Hello", {}))
    with pytest.raises(InferenceServerException, match="max_new_tokens"):
        client.infer(MODEL, kserve_inputs("Hello", {"max_tokens": 0}))
    client.close()


def test_tritonclient_streams_one_response_per_canvas_through_the_gateway(gw: RunningGateway) -> None:
    client = tc.InferenceServerClient(gw.grpc_address)
    results: queue.Queue[Any] = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    settings = {"max_tokens": 40, "max_denoising_steps": 2, "ignore_eos": True}
    client.async_stream_infer(MODEL, kserve_inputs("Hi", settings), request_id="r1")
    texts = []
    while True:
        result, error = results.get(timeout=60)
        assert error is None
        params = result.get_response().parameters
        if params["triton_final_response"].bool_param:
            break
        texts.append(result.as_numpy("text_output")[0])
    client.stop_stream()
    client.close()
    assert len(texts) == 3  # canvas 16: 16 + 16 + 8 tokens


def test_dgemma_serve_demo_starts_streams_one_reply_and_exits_zero() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "dgemma_cli.main", "serve", "--demo", "--port", "0",
                          "--grpc-port", "0"], capture_output=True, text=True, timeout=150, env=env,
                         preexec_fn=die_with_parent())
    assert out.returncode == 0, out.stderr[-2000:]
    assert "dgemma serve: gateway at http://127.0.0.1:" in out.stdout
    assert "curl -N http://127.0.0.1:" in out.stdout and "/v1/chat/completions" in out.stdout
    assert "-> 200" in out.stdout and "[usage: {'prompt_tokens'" in out.stdout
    # The bundled trained model: a reply of English words, valid UTF-8 (no replacement characters).
    reply = out.stdout.split("-> 200", 1)[1].split("[usage:", 1)[0]
    assert "\ufffd" not in reply and re.search(r"[A-Za-z]{3,} [A-Za-z]{3,}", reply), reply


def test_serve_gives_its_variant_the_checkpoints_canvas_and_step_cap(tmp_path: Path) -> None:
    # The gateway learns step shares per cap: its idea of the default cap must be the workers' own.
    assert checkpoint_shape(str(BUNDLED_MODEL_DIR)) == {"canvas_length": 32, "max_denoising_steps": 48}
    (tmp_path / "config.json").write_text('{"canvas_length": "many"}')
    assert checkpoint_shape(str(tmp_path)) == {} and checkpoint_shape("google/diffusiongemma-26B-A4B-it") == {}


@pytest.mark.parametrize("n", [12_000_000, 2**30])
def test_the_gateway_refuses_an_integer_text_input_without_building_that_many_bytes(
        gw: RunningGateway, n: int) -> None:
    client = tc.InferenceServerClient(gw.grpc_address)
    text = tc.InferInput("text_input", [1], "INT64")
    text.set_data_from_numpy(np.array([n], dtype=np.int64))
    with peak_rss_growth() as growth, pytest.raises(InferenceServerException) as info:
        client.infer(MODEL, [text])
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert info.value.message().startswith("text_input: must be a BYTES tensor")
    assert growth.mib < 64, f"an 8-byte tensor grew the gateway's peak RSS by {growth.mib:.0f} MiB"
    client.close()
