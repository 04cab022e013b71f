"""Images through the gateway: the OpenAI SDK and tritonclient through `dgemma serve`, and hostile images, each
refused with a 400 naming its part while the gateway's memory stays bounded and every decode runs in a pool process,
off its event loop."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import tritonclient.grpc as tc
from openai import OpenAI
from tritonclient.utils import InferenceServerException

from dgemma_common.images import ImageLimits, VisionSpec, soft_tokens
from dgemma_gateway import images as gateway_images
from dgemma_gateway.images import ImageSettings
from dgemma_gateway.openai_api import ApiLimits
from dgemma_serve.lifetime import die_with_parent
from dgemma_worker.model import TINY_MAX_SOFT_TOKENS, tiny_model_dir
from tests.common.imagefiles import image_bytes, png_bomb, truncated
from tests.gateway.gateway_harness import MODEL, Pool, RunningGateway, fast_gateway, static, variant
from tests.stack import DgemmaProcess

pytestmark = pytest.mark.timeout(240)
SPEC = VisionSpec(max_soft_tokens=TINY_MAX_SOFT_TOKENS)

gw = pytest.fixture(scope="module", name="gw")(fast_gateway)


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def image_part(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def user(*parts: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [*parts, {"type": "text", "text": "What is in this picture?"}]}]


# --- the OpenAI SDK and tritonclient through `dgemma serve` -----------------------------------------------


@pytest.fixture(scope="module")
def serve() -> Iterator[tuple[str, str]]:
    """`dgemma serve` on the random-weight tiny model, whose checkpoint has an image processor (the bundled trained
    one has none): (HTTP URL, KServe gRPC address)."""
    p = DgemmaProcess(["serve", "--model", str(tiny_model_dir()), "--port", "0", "--grpc-port", "0"])
    try:
        url = p.serving(150)
        yield url, p.kserve_address()
    finally:
        p.stop()


def test_the_openai_sdk_sends_a_data_url_image_and_usage_counts_its_tokens(serve: tuple[str, str]) -> None:
    url, _ = serve
    client = OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    settings: dict[str, Any] = {"max_tokens": 16, "extra_body": {"max_denoising_steps": 2}}
    without = client.chat.completions.create(model=model, messages=user(), **settings)  # type: ignore[arg-type]
    picture = image_bytes("PNG", (300, 200), color=(20, 160, 90))
    with_image = client.chat.completions.create(
        model=model, messages=user(image_part(data_url(picture))), **settings)  # type: ignore[arg-type]
    assert with_image.choices[0].finish_reason in ("stop", "length")
    assert with_image.usage is not None and without.usage is not None
    assert with_image.usage.prompt_tokens == without.usage.prompt_tokens + soft_tokens(300, 200, SPEC) + 2
    stream = client.chat.completions.create(model=model, messages=user(image_part(data_url(picture))),
                                            stream=True, stream_options={"include_usage": True},
                                            **settings)  # type: ignore[arg-type]
    usage = [chunk.usage for chunk in stream if chunk.usage is not None]
    assert usage[-1].prompt_tokens == with_image.usage.prompt_tokens


def test_tritonclient_sends_an_image_tensor_through_dgemma_serve(serve: tuple[str, str]) -> None:
    url, address = serve
    model = requests.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
    client = tc.InferenceServerClient(address)
    assert {i["name"] for i in client.get_model_metadata(model, as_json=True)["inputs"]} >= {"image"}

    def infer(images: list[bytes]) -> Any:
        text = tc.InferInput("text_input", [1], "BYTES")
        text.set_data_from_numpy(np.array([b"Describe:"], dtype=np.object_))
        inputs = [text]
        if images:
            tensor = tc.InferInput("image", [len(images)], "BYTES")
            tensor.set_data_from_numpy(np.array(images, dtype=np.object_))
            inputs.append(tensor)
        result = client.infer(model, inputs, parameters={"max_tokens": 16, "max_denoising_steps": 2})
        return result.get_response().parameters["prompt_tokens"].int64_param

    picture = image_bytes("WEBP", (300, 200))
    assert infer([picture]) == infer([]) + soft_tokens(300, 200, SPEC) + 2
    with pytest.raises(InferenceServerException, match=r"image\[1\]: the image is truncated or corrupt"):
        infer([picture, truncated(image_bytes("PNG", (300, 200)))])
    client.close()


# --- hostile images ------------------------------------------------------------------------------------------


class GatewayProcess:
    """`dgemma gateway` in its own process, so what the test client does cannot stall its event loop."""

    def __init__(self, endpoint: str, *flags: str) -> None:
        self.port_file = Path(tempfile.mkdtemp(prefix="dgemma-gw-")) / "ports.json"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dgemma_cli.main", "gateway", "--endpoint", f"{endpoint}=cpu:{MODEL}",
             "--host", "127.0.0.1", "--port", "0", "--grpc-port", "-1", "--port-file", str(self.port_file), *flags],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"},
            preexec_fn=die_with_parent())
        deadline = time.monotonic() + 60
        while not self.port_file.exists():
            assert self.proc.poll() is None and time.monotonic() < deadline, "the gateway did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{json.loads(self.port_file.read_text())['port']}"
        while requests.get(f"{self.url}/readyz", timeout=5).status_code != 200:
            assert time.monotonic() < deadline + 60, "no ready endpoint"
            time.sleep(0.1)

    def peak_rss_mib(self) -> float:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024  # type: ignore[union-attr]

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(15)


def post(gw: RunningGateway, messages: list[dict[str, Any]]) -> requests.Response:
    body = {"model": MODEL, "max_tokens": 16, "max_denoising_steps": 2, "messages": messages}
    return requests.post(f"{gw.url}/v1/chat/completions", json=body, timeout=120)


PNG = image_bytes("PNG", (300, 200))
HOSTILE: list[tuple[str, list[dict[str, Any]], str, str]] = [
    ("truncated", user(image_part(data_url(PNG)), image_part(data_url(truncated(PNG)))),
     "messages[0].content[1]", "truncated or corrupt"),
    ("wrong MIME", user(image_part(data_url(image_bytes("JPEG"), "image/png"))),
     "messages[0].content[0]", "declared image/png but the bytes are image/jpeg"),
    ("svg", user(image_part("data:image/svg+xml;base64,PHN2Zy8+")), "messages[0].content[0]", "unsupported image"),
    ("not base64", user(image_part("data:image/png;base64,***")), "messages[0].content[0]", "not valid base64"),
    ("bomb", user(image_part(data_url(png_bomb(20000, 20000)))), "messages[0].content[0]", "pixels"),
    ("100 images", user(*[image_part(data_url(PNG))] * 100), "messages", "100 images; at most 8 per request"),
    ("too big", user(image_part(data_url(b"\x89PNG" + b"\0" * (9 * 1024 * 1024)))),
     "messages[0].content[0]", "over the limit of 8388608 bytes"),
    ("image in a system message", [{"role": "system", "content": [image_part(data_url(PNG))]}],
     "messages[0].content[0]", "images go in user messages"),
    ("unknown part field", user({"type": "image_url", "image_url": {"url": data_url(PNG), "x": 1}}),
     "messages[0].content[0].image_url.x", "unknown field"),
    ("loopback", user(image_part("http://127.0.0.1:9/cat.png")), "messages[0].content[0]", "non-public address"),
    ("metadata service", user(image_part("http://169.254.169.254/latest/meta-data/")), "messages[0].content[0]",
     "non-public address"),
    ("cluster Service", user(image_part("http://dgemma-worker.dgemma.svc.cluster.local:50051/x.png")),
     "messages[0].content[0]", "not on this server's list"),
    ("not allowed", user(image_part("https://evil.test/x.png")), "messages[0].content[0]", "not on this server's list"),
    ("file URL", user(image_part("file:///etc/passwd")), "messages[0].content[0]", "http(s) URL or a data: URL"),
]


def test_hostile_images_are_each_a_400_naming_the_part_and_the_gateways_memory_stays_bounded(pool: Pool) -> None:
    hosts = "127.0.0.1,169.254.169.254,dgemma-worker.dgemma.svc.cluster.local,*.example.com"
    gateway = GatewayProcess(pool.fast[0].address, "--image-url-hosts", hosts, "--image-decode-slots", "1")
    try:
        bodies = [(name, json.dumps({"model": MODEL, "max_tokens": 16, "max_denoising_steps": 2,
                                     "messages": messages}), param, reason)
                  for name, messages, param, reason in HOSTILE]
        # Legitimate work alongside: large images, decoded while the hostile ones are refused.
        big = json.dumps({"model": MODEL, "max_tokens": 16, "max_denoising_steps": 2,
                          "messages": user(image_part(data_url(image_bytes("PNG", (4000, 4000)))))})
        baseline_mib = gateway.peak_rss_mib()
        results: list[int] = []
        side = threading.Thread(target=lambda: results.extend(
            requests.post(f"{gateway.url}/v1/chat/completions", data=big, timeout=120,
                          headers={"Content-Type": "application/json"}).status_code for _ in range(4)))
        side.start()
        for name, body, param, reason in bodies:
            response = requests.post(f"{gateway.url}/v1/chat/completions", data=body, timeout=120,
                                     headers={"Content-Type": "application/json"})
            assert response.status_code == 400, (name, response.text)
            error = response.json()["error"]
            assert error["param"] == param, (name, error)
            assert reason in error["message"], (name, error)
        side.join(180)
        assert results == [200] * 4
        grown_mib = gateway.peak_rss_mib() - baseline_mib
    finally:
        gateway.close()
    assert grown_mib < 200, f"the gateway's memory grew by {grown_mib:.0f} MiB"  # the bomb alone decodes to 400 MB


UNPACK_AND_CHECK = gateway_images._unpack_and_check  # the real one, also in a pool process that imports this


@dataclass(frozen=True)
class RecordingCheck:
    """Stands in for the gateway's image check: appends the process and thread it runs on to `record`, then checks.
    Pickled by value, so it records from whichever process the gateway hands the check to."""

    record: Path

    def __call__(self, payload: str | bytes, field: str, *args: Any) -> Any:
        with self.record.open("a") as f:
            f.write(f"{os.getpid()} {threading.current_thread().name} {field}\n")
        return UNPACK_AND_CHECK(payload, field, *args)


def test_images_are_decoded_in_pool_processes_never_in_the_gateways_own_process(
        pool: Pool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Decoding a large image holds the GIL for 100-400 ms: on the event loop, or on a thread beside it, it would
    # stall every stream the gateway serves. So every decode, hostile or not, must run in another process.
    record = tmp_path / "decodes"
    monkeypatch.setattr(gateway_images, "_unpack_and_check", RecordingCheck(record))
    g = RunningGateway([static((pool.fast[0].address, variant("cpu")))],
                       limits=ApiLimits(images=ImageSettings(decode_slots=1)))
    try:
        g.wait_ready(1)
        assert post(g, user(image_part(data_url(PNG)))).status_code == 200
        bomb = post(g, user(image_part(data_url(png_bomb(20000, 20000)))))
        assert bomb.status_code == 400 and "pixels" in bomb.json()["error"]["message"]
        broken = post(g, user(image_part(data_url(truncated(PNG)))))
        assert broken.status_code == 400 and "truncated or corrupt" in broken.json()["error"]["message"]
    finally:
        g.close()
    decodes = [line.split() for line in record.read_text().splitlines() if not line.endswith(" warm-up")]
    assert len(decodes) == 3, decodes
    assert all(int(pid) != os.getpid() for pid, _, _ in decodes), f"decoded in the gateway's process: {decodes}"


def test_a_remote_image_url_is_refused_when_remote_fetching_is_off(gw: RunningGateway) -> None:
    response = post(gw, user(image_part("https://images.example.com/cat.png")))
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "messages[0].content[0]"
    assert "remote image URLs are not enabled" in response.json()["error"]["message"]


def test_the_kserve_front_refuses_bad_images_naming_the_tensor_element(gw: RunningGateway) -> None:
    client = tc.InferenceServerClient(gw.grpc_address)
    text = tc.InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([b"hi"], dtype=np.object_))
    images = tc.InferInput("image", [2], "BYTES")
    images.set_data_from_numpy(np.array([PNG, png_bomb(20000, 20000)], dtype=np.object_))
    with pytest.raises(InferenceServerException, match=r"image\[1\]: the image has more than"):
        client.infer(MODEL, [text, images])
    many = tc.InferInput("image", [9], "BYTES")
    many.set_data_from_numpy(np.array([PNG] * 9, dtype=np.object_))
    with pytest.raises(InferenceServerException, match="image: 9 images; at most 8 per request"):
        client.infer(MODEL, [text, many])
    client.close()


def test_image_limits_are_the_gateways_flags(pool: Pool) -> None:
    limits = ApiLimits(images=ImageSettings(limits=ImageLimits(max_images=1, max_pixels=100 * 100)))
    g = RunningGateway([static((pool.fast[0].address, variant("cpu")))], limits=limits)
    try:
        g.wait_ready(1)
        small = data_url(image_bytes("PNG", (50, 50)))
        assert post(g, user(image_part(small))).status_code == 200
        two = post(g, user(image_part(small), image_part(small)))
        assert two.status_code == 400 and "2 images; at most 1" in two.json()["error"]["message"]
        large = post(g, user(image_part(data_url(image_bytes("PNG", (200, 200))))))
        assert large.status_code == 400 and "200x200 pixels; the limit is 10000" in large.json()["error"]["message"]
    finally:
        g.close()


def test_images_count_against_the_prompt_limit(pool: Pool) -> None:
    g = RunningGateway([static((pool.fast[0].address, variant("cpu")))], limits=ApiLimits(max_prompt_tokens=100))
    try:
        g.wait_ready(1)
        one = data_url(image_bytes("PNG", (300, 200)))  # 62 tokens
        assert post(g, user(image_part(one))).status_code == 200
        response = post(g, user(image_part(one), image_part(one)))
        assert response.status_code == 413, response.text
        assert json.loads(response.text)["error"]["code"] == "prompt_too_long"
    finally:
        g.close()
