"""Image prompts in the engine: what the encoder gets is what transformers' own processor and generate() give it."""

from __future__ import annotations

import io
import queue
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from dgemma_common.images import ImageLimits, VisionSpec, soft_tokens
from dgemma_common.params import GenerationParams, ParamError
from dgemma_common.types import ChatMessage, FinalEvent, ImageData, Prompt
from dgemma_worker.engine import Engine, EngineConfig
from dgemma_worker.model import TINY_MAX_SOFT_TOKENS, LoadedModel, load_model
from tests.common.imagefiles import image_bytes, truncated

SPEC = VisionSpec(max_soft_tokens=TINY_MAX_SOFT_TOKENS)
FEW = GenerationParams(max_new_tokens=16, max_denoising_steps=2, seed=3)


def reference_processor(model_dir: Path) -> Any:
    """transformers' processor for the checkpoint, as a user would load it.

    Gemma4Processor insists on its video processor, which transformers builds only with torchvision (no CPU
    wheel of it installs here); without torchvision the check of that one argument is skipped, and every
    other line is transformers' own.
    """
    try:
        import torchvision  # noqa: F401
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(model_dir)
    except ImportError:
        pass
    from transformers import AutoImageProcessor, AutoTokenizer
    from transformers.models.gemma4 import Gemma4Processor

    class WithoutVideo(Gemma4Processor):
        def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
            return None if argument is None else super().check_argument_for_proper_class(argument_name, argument)

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return WithoutVideo(feature_extractor=None, image_processor=AutoImageProcessor.from_pretrained(model_dir),
                        tokenizer=tokenizer, video_processor=None, chat_template=tokenizer.chat_template)


class EncoderCalls:
    """Records the keyword arguments and outputs of the model's encoder, however it is called."""

    def __init__(self, model: Any) -> None:
        self.calls: list[tuple[dict[str, Any], Any]] = []
        self._handle = model.model.encoder.register_forward_hook(self._record, with_kwargs=True)

    def _record(self, module: Any, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        self.calls.append((dict(kwargs), output))

    def close(self) -> None:
        self._handle.remove()


def _until_final(events: queue.SimpleQueue[Any]) -> list[Any]:
    out = [events.get(timeout=120)]
    while not isinstance(out[-1], FinalEvent):
        out.append(events.get(timeout=120))
    return out


def _image_prompt(data: bytes) -> Prompt:
    return Prompt.of_messages([ChatMessage("user", (ImageData(data), "What is in this picture?"))])


def test_the_encoder_input_matches_transformers_processor_and_generate(tiny_dir: Path, loaded: LoadedModel) -> None:
    data = image_bytes("PNG", (300, 200), color=(30, 120, 220))
    processor = reference_processor(tiny_dir)
    picture = Image.open(io.BytesIO(data))
    conversation = [{"role": "user", "content": [{"type": "image", "image": picture},
                                                 {"type": "text", "text": "What is in this picture?"}]}]
    ref = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=True,
                                        return_tensors="pt")
    model = loaded.model

    calls = EncoderCalls(model)
    try:
        with torch.inference_mode():
            model.generate(**ref, max_new_tokens=16, max_denoising_steps=1)
        reference_kwargs, reference_out = calls.calls[0]
        calls.calls.clear()
        engine = Engine(loaded, EngineConfig(max_active=1, max_queue=1))
        engine.start(warmup=False)
        try:
            ids = engine.tokenize(_image_prompt(data))
            events = list(engine.generate(_image_prompt(data), FEW))
        finally:
            engine.shutdown()
        ours_kwargs, ours_out = calls.calls[0]
    finally:
        calls.close()

    assert ids == ref["input_ids"][0].tolist()
    assert isinstance(events[-1], FinalEvent) and events[-1].stats.prompt_tokens == len(ids)
    for name in ("input_ids", "pixel_values", "image_position_ids", "mm_token_type_ids"):
        assert torch.equal(ours_kwargs[name], reference_kwargs[name]), name
    assert torch.equal(ours_out.last_hidden_state, reference_out.last_hidden_state)
    # The image is really in it: its soft tokens and the two markers around them.
    assert int((ref["mm_token_type_ids"] == 1).sum()) == soft_tokens(300, 200, SPEC)


def test_an_image_adds_its_tokens_and_changes_what_the_encoder_sees(engine: Engine) -> None:
    text_only = Prompt.of_messages([ChatMessage("user", "What is in this picture?")])
    red, blue = image_bytes("PNG", (300, 200), (255, 0, 0)), image_bytes("PNG", (300, 200), (0, 0, 255))
    assert len(engine.tokenize(_image_prompt(red))) == len(engine.tokenize(text_only)) + soft_tokens(300, 200, SPEC) + 2
    outputs = []
    for data in (red, blue):
        events = list(engine.generate(_image_prompt(data), GenerationParams(max_new_tokens=16, max_denoising_steps=4,
                                                                           seed=0, ignore_eos=True)))
        outputs.append([t for e in events if hasattr(e, "token_ids") and not isinstance(e, FinalEvent)
                        for t in e.token_ids])
    assert outputs[0] != outputs[1]  # same seed, same text, different pixels: a different reply


def test_images_of_a_text_prompt_go_before_the_text(engine: Engine) -> None:
    data = image_bytes("JPEG", (120, 360))
    ids = engine.tokenize(Prompt.of_text("Hello", [ImageData(data), ImageData(data)]))
    text = engine.tokenize(Prompt.of_text("Hello"))  # the tiny tokenizer adds no BOS to raw text
    block = soft_tokens(120, 360, SPEC) + 2
    boi = engine.loaded.tokenizer.convert_tokens_to_ids("<start_of_image>")
    assert ids[0] == boi and ids[block] == boi and ids[2 * block:] == text


def test_user_text_cannot_write_image_tokens(engine: Engine) -> None:
    data = image_bytes("PNG", (64, 64))
    sneaky = Prompt.of_messages([ChatMessage("user", (ImageData(data), "<image_soft_token><start_of_image>"))])
    ids = engine.tokenize(sneaky)
    image_token = engine.loaded.tokenizer.convert_tokens_to_ids("<image_soft_token>")
    assert ids.count(image_token) == soft_tokens(64, 64, SPEC)  # the typed ones are encoded as text
    events = list(engine.generate(sneaky, FEW))
    assert isinstance(events[-1], FinalEvent) and events[-1].error is None


def test_a_batch_mixing_image_and_text_requests_keeps_each_row_exact(loaded: LoadedModel) -> None:
    prompts = [_image_prompt(image_bytes("PNG", (300, 200))), Prompt.of_text("plain text, no image"),
               _image_prompt(image_bytes("GIF", (90, 400), frames=3))]
    alone = []
    solo = Engine(loaded, EngineConfig(max_active=1, max_queue=4))
    solo.start(warmup=False)
    try:
        alone = [[e.token_ids for e in solo.generate(p, FEW) if not isinstance(e, FinalEvent)] for p in prompts]
    finally:
        solo.shutdown()
    batched = Engine(loaded, EngineConfig(max_active=3, max_queue=4, max_batch=3, batch_window_s=0.5))
    batched.start(warmup=False)
    sinks: list[queue.SimpleQueue[Any]] = [queue.SimpleQueue() for _ in prompts]
    try:
        for p, sink in zip(prompts, sinks, strict=True):  # all queued at once: one batch of three rows
            batched.submit(p, FEW, sink.put)
        together = [_until_final(sink) for sink in sinks]
    finally:
        batched.shutdown()
    assert batched.counters.encoder_passes == 1  # the three prompts, images and all, in one encoder pass
    assert [[e.token_ids for e in events if not isinstance(e, FinalEvent)] for events in together] == alone


@pytest.mark.parametrize(("data", "reason"), [
    (truncated(image_bytes("PNG", (300, 200))), "truncated"),
    (b"GIF89a not really", "not a PNG"),
    (b"", "not a PNG"),
])
def test_a_bad_image_is_refused_before_it_is_queued_naming_its_part(engine: Engine, data: bytes, reason: str) -> None:
    with pytest.raises(ParamError, match=reason) as info:
        engine.submit(_image_prompt(data), FEW, lambda e: None)
    assert info.value.field == "prompt.chat.messages[0].parts[0]"
    with pytest.raises(ParamError) as info:
        engine.submit(Prompt.of_text("hi", [ImageData(image_bytes()), ImageData(data)]), FEW, lambda e: None)
    assert info.value.field == "prompt.images[1]"


def test_image_limits_are_the_engine_configs(loaded: LoadedModel) -> None:
    eng = Engine(loaded, EngineConfig(image_limits=ImageLimits(max_images=1, max_pixels=100 * 100)))
    two = Prompt.of_text("hi", [ImageData(image_bytes()), ImageData(image_bytes())])
    with pytest.raises(ParamError, match="2 images; at most 1 per request"):
        eng.tokenize(two)
    with pytest.raises(ParamError, match="200x200 pixels; the limit is 10000"):
        eng.tokenize(Prompt.of_text("hi", [ImageData(image_bytes("PNG", (200, 200)))]))


def test_a_checkpoint_without_an_image_processor_serves_text_and_refuses_images(tiny_dir: Path,
                                                                               tmp_path: Path) -> None:
    text_only = tmp_path / "text-only"
    shutil.copytree(tiny_dir, text_only)
    (text_only / "processor_config.json").unlink()
    loaded = load_model(text_only, device="cpu")
    assert loaded.processor is None and loaded.vision is None
    eng = Engine(loaded)
    assert eng.tokenize(Prompt.of_text("hello"))
    with pytest.raises(ParamError, match="this model takes no images"):
        eng.tokenize(Prompt.of_text("hello", [ImageData(image_bytes())]))


def test_the_load_snapshot_carries_the_image_geometry_and_the_encoder_cost_per_token(engine: Engine) -> None:
    list(engine.generate(_image_prompt(image_bytes()), FEW))
    snap = engine.load_snapshot()
    assert snap.vision == SPEC
    assert snap.encoder_token_latency_s > 0
