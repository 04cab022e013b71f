"""Image prompts: the checkpoint's own Gemma 4 processor turns text and images into the encoder's first input.

Images arrive encoded (PNG, JPEG, WebP, GIF); each is checked and decoded by `dgemma_common.images` (limits
first, header before pixels), then the processor does the rest exactly as transformers does for
`DiffusionGemmaForBlockDiffusion.generate`: the chat template writes one image token per image, each is
expanded into begin-of-image, the image's soft tokens and end-of-image, the image processor resizes and
patchifies the pixels, and `mm_token_type_ids` marks the soft tokens. The encoder's first pass then runs the
vision tower and scatters its features into those positions.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from transformers.models.gemma4 import Gemma4Processor

from dgemma_common.images import ImageLimits, VisionSpec, decode_rgb
from dgemma_common.params import ParamError
from dgemma_common.types import ImageData, Prompt

log = logging.getLogger(__name__)


class TextAndImageProcessor(Gemma4Processor):
    """transformers' Gemma4Processor without its video and audio parts.

    transformers builds Gemma 4's video processor only where torchvision is installed; images need neither it
    nor the audio feature extractor. Everything images use (chat template, placeholder expansion, the image
    processor, token types, control-token sanitizing) is transformers' own code.
    """

    def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
        if argument is None and argument_name in ("video_processor", "feature_extractor"):
            return None
        return super().check_argument_for_proper_class(argument_name, argument)


def load_processor(source: str, revision: str | None = None) -> TextAndImageProcessor | None:
    """The checkpoint's processor, or None when it has no image processor config (a text-only worker)."""
    from transformers import AutoImageProcessor, AutoTokenizer

    kwargs: dict[str, Any] = {"revision": revision} if revision else {}
    try:
        # The Pillow backend everywhere, so a request is preprocessed the same on every worker.
        image_processor = AutoImageProcessor.from_pretrained(source, backend="pil", **kwargs)
    except OSError:
        return None
    # Its own tokenizer: Gemma4Processor adds a video token to the tokenizer it is given.
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    try:
        processor = TextAndImageProcessor(
            feature_extractor=None, image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
            chat_template=tokenizer.chat_template,
        )
        # One small image through it now, so a checkpoint whose tokenizer lacks what the processor needs
        # serves text only instead of failing every image request.
        processor(text=[processor.image_token], images=[[Image.new("RGB", (32, 32))]], return_tensors="pt")
    except (AttributeError, TypeError, ValueError) as exc:
        log.warning("%s: its image processor does not work here (%s); serving text only", source, exc)
        return None
    return processor


def vision_spec(processor: Any) -> VisionSpec:
    """The geometry a gateway needs to count an image's tokens."""
    ip = processor.image_processor
    return VisionSpec(patch_size=int(ip.patch_size), pooling_kernel_size=int(ip.pooling_kernel_size),
                      max_soft_tokens=int(ip.max_soft_tokens))


@dataclass(frozen=True)
class VisionInputs:
    """The image part of one request's first encoder pass, as the processor returns it."""

    pixel_values: torch.Tensor  # (images, max_patches, 3 * patch_size^2)
    image_position_ids: torch.Tensor  # (images, max_patches, 2); padding patches are (-1, -1)
    mm_token_type_ids: torch.Tensor  # (prompt_tokens,): 1 on image soft tokens


@dataclass(frozen=True)
class EncodedPrompt:
    """A prompt as the encoder takes it: token ids and, with images, their pixels."""

    ids: list[int]
    vision: VisionInputs | None = None


def image_fields(prompt: Prompt) -> list[str]:
    """The name of each image of the prompt, in order, for errors that name the part."""
    if prompt.messages is None:
        return [f"prompt.images[{k}]" for k in range(len(prompt.images))]
    return [f"prompt.chat.messages[{i}].parts[{j}]"
            for i, m in enumerate(prompt.messages) if not isinstance(m.content, str)
            for j, p in enumerate(m.content) if isinstance(p, ImageData)]


def encode_image_prompt(processor: Any, prompt: Prompt, limits: ImageLimits) -> EncodedPrompt:
    """Check, decode and preprocess a prompt's images; ParamError names the part that is refused."""
    if processor is None:
        raise ParamError("prompt.images", "this model takes no images (its checkpoint has no image processor)")
    images = prompt.all_images
    limits.check_count(len(images), "prompt.images")
    pixels = [decode_rgb(image.data, name, limits, image.mime_type)
              for image, name in zip(images, image_fields(prompt), strict=True)]
    try:
        if prompt.messages is not None:
            out = processor.apply_chat_template(
                _conversation(prompt, pixels), add_generation_prompt=True, tokenize=True, return_dict=True,
                return_tensors="pt", sanitize_control_tokens=True,  # user text cannot write image tokens
            )
        else:
            # A raw text prompt: the images go first, as the processor lays out images without placeholders.
            text = processor.image_token * len(pixels) + (prompt.text or "")
            out = processor(text=[text], images=[pixels], add_special_tokens=True, return_tensors="pt")
    except ValueError as exc:  # the processor's own checks (e.g. image tokens typed into a raw text prompt)
        raise ParamError("prompt", str(exc)) from None
    return EncodedPrompt(
        ids=out["input_ids"][0].tolist(),
        vision=VisionInputs(out["pixel_values"], out["image_position_ids"], out["mm_token_type_ids"][0]),
    )


def _conversation(prompt: Prompt, pixels: Sequence[Any]) -> list[dict[str, Any]]:
    queue = iter(pixels)
    out: list[dict[str, Any]] = []
    for m in prompt.messages or ():
        if isinstance(m.content, str):
            out.append({"role": m.role, "content": m.content})
        else:
            parts = [{"type": "text", "text": p} if isinstance(p, str) else {"type": "image", "image": next(queue)}
                     for p in m.content]
            out.append({"role": m.role, "content": parts})
    return out


def batch_vision(rows: Sequence[VisionInputs | None], width: int, device: torch.device) -> dict[str, torch.Tensor]:
    """The encoder's image arguments for left-padded rows of `width` tokens ({} when no row has images).

    The encoder scatters image features into the image tokens in row-major order, so the rows' images are
    concatenated in row order.
    """
    present = [r for r in rows if r is not None]
    if not present:
        return {}
    types = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    for i, r in enumerate(rows):
        if r is not None:
            types[i, width - r.mm_token_type_ids.shape[0]:] = r.mm_token_type_ids.to(device)
    return {
        "pixel_values": torch.cat([r.pixel_values for r in present]).to(device),
        "image_position_ids": torch.cat([r.image_position_ids for r in present]).to(device),
        "mm_token_type_ids": types,
    }
