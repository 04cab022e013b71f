"""Client images, checked the same way by every front end: bounded before any work, decoded only when safe.

Hostile images are the normal case. An image is refused (`ParamError` naming its part) when its encoded size
is over the limit, when its header does not say PNG, JPEG, WebP or GIF, when it is not what its declared MIME
type says, or when the header's width x height is over the pixel limit: all of that reads only the header, so
a decompression bomb is refused before a single pixel is decoded. Only then is the first frame decoded, which
finds truncated and corrupt files. Decoding is CPU work: callers run it off their event loop.

`soft_tokens` is the number of tokens an image costs in the prompt, the arithmetic of transformers' Gemma 4
image processor (`get_aspect_ratio_preserving_size`), so the gateway can count image tokens without it.
"""

from __future__ import annotations

import argparse
import io
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from PIL import Image

from dgemma_common.params import ParamError

# The only decoders ever tried on client bytes.
DECODERS = ("PNG", "JPEG", "WEBP", "GIF")
# Pillow format name -> MIME type. MPO is how Pillow names a JPEG that carries extra pictures (cameras write them).
FORMATS: dict[str, str] = {
    "PNG": "image/png", "JPEG": "image/jpeg", "MPO": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif",
}
MIME_TYPES = frozenset(FORMATS.values())
# Tokens an image adds around its soft tokens: Gemma 4's begin- and end-of-image markers.
MARKER_TOKENS = 2


@dataclass(frozen=True)
class ImageLimits:
    """Per-request bounds on images; every one is a flag of the gateway and the worker."""

    max_images: int = 8  # images in one request
    max_bytes: int = 8 * 1024 * 1024  # encoded bytes of one image
    max_pixels: int = 4096 * 4096  # width x height of one image, read from its header before decoding

    def check_count(self, count: int, field: str) -> None:
        """Refuse more images than `max_images`."""
        if count > self.max_images:
            raise ParamError(field, f"{count} images; at most {self.max_images} per request")


# flag dest -> environment variable, the same for the gateway and the worker
IMAGE_LIMIT_ENV = {
    "max_images": "DGEMMA_MAX_IMAGES",
    "max_image_bytes": "DGEMMA_MAX_IMAGE_BYTES",
    "max_image_pixels": "DGEMMA_MAX_IMAGE_PIXELS",
}


def add_image_limit_flags(add: Callable[..., Any]) -> None:
    """Add --max-images, --max-image-bytes and --max-image-pixels with `add(flag, dest, help, **kw)`."""
    d = ImageLimits()
    add("--max-images", "max_images", f"images in one request; 0: none (default {d.max_images})", type=int)
    add("--max-image-bytes", "max_image_bytes", f"encoded bytes of one image (default {d.max_bytes})", type=int)
    add("--max-image-pixels", "max_image_pixels",
        f"width x height of one image, checked in its header before decoding (default {d.max_pixels})", type=int)


def image_limits_from(args: argparse.Namespace, parser: argparse.ArgumentParser) -> ImageLimits:
    """The image limits the flags of `add_image_limit_flags` give (unset: the defaults)."""
    d = ImageLimits()
    limits = ImageLimits(
        max_images=d.max_images if args.max_images is None else args.max_images,
        max_bytes=d.max_bytes if args.max_image_bytes is None else args.max_image_bytes,
        max_pixels=d.max_pixels if args.max_image_pixels is None else args.max_image_pixels,
    )
    if limits.max_images < 0 or min(limits.max_bytes, limits.max_pixels) < 1:
        parser.error("--max-images must be >= 0, --max-image-bytes and --max-image-pixels >= 1")
    return limits


@dataclass(frozen=True)
class ImageInfo:
    """What the header of a checked image says."""

    mime_type: str
    width: int
    height: int


@dataclass(frozen=True)
class VisionSpec:
    """The model's image processor geometry, enough to count an image's tokens from its size."""

    patch_size: int = 16
    pooling_kernel_size: int = 3
    max_soft_tokens: int = 280


def inspect_image(data: bytes, field: str, limits: ImageLimits, declared_mime: str | None = None) -> ImageInfo:
    """Check size, format, declared type and pixel count from the header alone (no pixel is decoded)."""
    with _open(data, field, limits, declared_mime) as image:
        return _info(image)


def check_image(data: bytes, field: str, limits: ImageLimits, declared_mime: str | None = None) -> ImageInfo:
    """`inspect_image`, then decode the first frame to find truncated or corrupt files; the pixels are dropped."""
    with _open(data, field, limits, declared_mime) as image:
        _decode(image, field)
        return _info(image)


def decode_rgb(data: bytes, field: str, limits: ImageLimits, declared_mime: str | None = None) -> Image.Image:
    """The first frame as an RGB image, after the checks of `inspect_image`."""
    with _open(data, field, limits, declared_mime) as image:
        _decode(image, field)
        return image.convert("RGB")


def _open(data: bytes, field: str, limits: ImageLimits, declared_mime: str | None) -> Image.Image:
    if len(data) > limits.max_bytes:
        raise ParamError(field, f"the image has {len(data)} bytes; the limit is {limits.max_bytes}")
    if declared_mime is not None and declared_mime not in MIME_TYPES:
        raise ParamError(field, f"unsupported image type {declared_mime!r}; use one of {sorted(MIME_TYPES)}")
    try:
        with warnings.catch_warnings():
            # Pillow warns, then raises, on huge images; our own limit below is the one that decides.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=list(DECODERS))
    except Image.DecompressionBombError:
        raise ParamError(field, f"the image has more than {limits.max_pixels} pixels") from None
    except (OSError, SyntaxError, ValueError, EOFError):  # Pillow's ways of saying "not an image it knows"
        raise ParamError(field, "not a PNG, JPEG, WebP or GIF image") from None
    mime = FORMATS[str(image.format)]
    width, height = image.size
    if declared_mime is not None and declared_mime != mime:
        image.close()
        raise ParamError(field, f"declared {declared_mime} but the bytes are {mime}")
    if width < 1 or height < 1 or width * height > limits.max_pixels:
        image.close()
        raise ParamError(field, f"the image is {width}x{height} pixels; the limit is {limits.max_pixels} pixels")
    return image


def _decode(image: Image.Image, field: str) -> None:
    try:
        image.seek(0)  # the first frame of an animation
        image.load()
    except Image.DecompressionBombError:
        raise ParamError(field, "the image decodes to more pixels than its header says") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError):
        raise ParamError(field, "the image is truncated or corrupt") from None


def _info(image: Image.Image) -> ImageInfo:
    return ImageInfo(FORMATS[str(image.format)], image.size[0], image.size[1])


def soft_tokens(width: int, height: int, spec: VisionSpec, field: str = "image") -> int:
    """Soft tokens of a width x height image: the processor's aspect-preserving resize into the patch budget.

    Mirrors transformers 5.23's `get_aspect_ratio_preserving_size` and `Gemma4Processor._get_num_multimodal_tokens`
    (tests compare the two over many sizes). Raises ParamError where the processor would raise.
    """
    patch, kernel = spec.patch_size, spec.pooling_kernel_size
    max_patches = spec.max_soft_tokens * kernel**2
    factor = math.sqrt(max_patches * patch**2 / (height * width))
    side = kernel * patch
    target_h = math.floor(factor * height / side) * side
    target_w = math.floor(factor * width / side) * side
    if target_h == 0 and target_w == 0:
        raise ParamError(field, f"a {width}x{height} image cannot be resized for the model")
    max_side = (max_patches // kernel**2) * side
    if target_h == 0:
        target_h, target_w = side, min(math.floor(width / height) * side, max_side)
    elif target_w == 0:
        target_w, target_h = side, min(math.floor(height / width) * side, max_side)
    if target_h * target_w > max_patches * patch**2:
        raise ParamError(field, f"a {width}x{height} image does not fit the model's patch budget")
    return (target_h // patch) * (target_w // patch) // kernel**2


def prompt_tokens_of(info: ImageInfo, spec: VisionSpec, field: str = "image") -> int:
    """Tokens the image takes in the prompt: its soft tokens and the markers around them."""
    return soft_tokens(info.width, info.height, spec, field) + MARKER_TOKENS
