"""Images through the worker's two front ends: dgemma.v1 content parts and the KServe `image` tensor."""

from __future__ import annotations

import json
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from dgemma_common.images import VisionSpec, soft_tokens
from dgemma_proto.dgemma.v1 import denoiser_pb2 as pb
from dgemma_worker.model import TINY_MAX_SOFT_TOKENS
from tests.common.imagefiles import image_bytes, truncated

from .conftest import RunningWorker

pytestmark = pytest.mark.timeout(120)
SPEC = VisionSpec(max_soft_tokens=TINY_MAX_SOFT_TOKENS)
FEW = pb.GenerationParams(max_new_tokens=16, max_denoising_steps=2, seed=1)
PICTURE = image_bytes("PNG", (300, 200))
PICTURE_TOKENS = soft_tokens(300, 200, SPEC) + 2


def _chat(*parts: pb.ContentPart) -> pb.Prompt:
    return pb.Prompt(chat=pb.ChatMessages(messages=[pb.ChatMessage(role="user", parts=list(parts))]))


def _final(stub: Any, prompt: pb.Prompt) -> pb.Final:
    responses = list(stub.Generate(pb.GenerateRequest(prompt=prompt, params=FEW), timeout=60))
    return responses[-1].final


def test_a_chat_image_part_costs_its_tokens_in_the_reported_prompt_tokens(worker: RunningWorker) -> None:
    text = pb.ContentPart(text="What is this?")
    with_image = _final(worker.stub, _chat(pb.ContentPart(image=pb.Image(data=PICTURE, mime_type="image/png")), text))
    without = _final(worker.stub, _chat(text))
    assert with_image.stats.prompt_tokens == without.stats.prompt_tokens + PICTURE_TOKENS
    counted = worker.stub.Tokenize(pb.TokenizeRequest(prompt=_chat(pb.ContentPart(image=pb.Image(data=PICTURE)),
                                                                   text)), timeout=60)
    assert len(counted.token_ids) == with_image.stats.prompt_tokens


def test_the_load_report_says_how_images_are_counted(worker: RunningWorker) -> None:
    report = worker.stub.GetLoad(pb.GetLoadRequest(), timeout=10)
    assert report.HasField("vision")
    assert (report.vision.patch_size, report.vision.pooling_kernel_size, report.vision.max_soft_tokens) == (
        16, 3, TINY_MAX_SOFT_TOKENS)


@pytest.mark.parametrize(("image", "reason"), [
    (pb.Image(data=truncated(PICTURE)), "truncated"),
    (pb.Image(data=PICTURE, mime_type="image/jpeg"), "declared image/jpeg but the bytes are image/png"),
    (pb.Image(data=b"\x00" * 100), "not a PNG, JPEG, WebP or GIF"),
])
def test_a_bad_image_is_invalid_argument_naming_its_part(worker: RunningWorker, image: pb.Image, reason: str) -> None:
    prompt = _chat(pb.ContentPart(text="look:"), pb.ContentPart(image=image))
    with pytest.raises(grpc.RpcError) as info:
        _final(worker.stub, prompt)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("prompt.chat.messages[0].parts[1]: ")
    assert reason in info.value.details()


def test_images_with_a_token_prompt_are_refused(worker: RunningWorker) -> None:
    prompt = pb.Prompt(tokens=pb.TokenIds(ids=[5, 6]), images=[pb.Image(data=PICTURE)])
    with pytest.raises(grpc.RpcError) as info:
        _final(worker.stub, prompt)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT and "prompt.images" in info.value.details()


def _bytes_input(name: str, items: list[bytes]) -> tc.InferInput:
    tensor = tc.InferInput(name, [len(items)], "BYTES")
    tensor.set_data_from_numpy(np.array(items, dtype=np.object_))
    return tensor


def _prompt_tokens(result: Any) -> int:
    return int(result.get_response().parameters["prompt_tokens"].int64_param)


def test_tritonclient_sends_images_beside_text_input_and_messages(worker: RunningWorker) -> None:
    client = tc.InferenceServerClient(worker.address)
    params = {"max_new_tokens": 16, "max_denoising_steps": 2}
    assert {i["name"] for i in client.get_model_metadata("tiny", as_json=True)["inputs"]} >= {"image"}
    plain = client.infer("tiny", [_bytes_input("text_input", [b"Describe:"])], parameters=params)
    two = client.infer("tiny", [_bytes_input("text_input", [b"Describe:"]), _bytes_input("image", [PICTURE] * 2)],
                       parameters=params)
    assert _prompt_tokens(two) == _prompt_tokens(plain) + 2 * PICTURE_TOKENS
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe:"}]}]
    chat = client.infer("tiny", [_bytes_input("messages", [json.dumps(messages).encode()]),
                                 _bytes_input("image", [image_bytes("JPEG", (300, 200))])], parameters=params)
    text_chat = client.infer("tiny", [_bytes_input("messages", [json.dumps(
        [{"role": "user", "content": "Describe:"}]).encode()])], parameters=params)
    assert _prompt_tokens(chat) == _prompt_tokens(text_chat) + PICTURE_TOKENS
    with pytest.raises(InferenceServerException, match="image: 2 images given but the messages have 1 image parts"):
        client.infer("tiny", [_bytes_input("messages", [json.dumps(messages).encode()]),
                              _bytes_input("image", [PICTURE, PICTURE])], parameters=params)
    with pytest.raises(InferenceServerException, match=r"prompt.images\[0\]: the image is truncated"):
        client.infer("tiny", [_bytes_input("text_input", [b"x"]), _bytes_input("image", [truncated(PICTURE)])],
                     parameters=params)
    client.close()
