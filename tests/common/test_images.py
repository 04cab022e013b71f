"""Client images are checked header first, decoded only within limits, and refused naming their part."""

from __future__ import annotations

import random
import resource

import pytest

from dgemma_common.images import (
    ImageLimits,
    VisionSpec,
    check_image,
    decode_rgb,
    inspect_image,
    prompt_tokens_of,
    soft_tokens,
)
from dgemma_common.params import ParamError
from tests.common.imagefiles import image_bytes, png_bomb, truncated

LIMITS = ImageLimits()


@pytest.mark.parametrize(("fmt", "mime"), [("PNG", "image/png"), ("JPEG", "image/jpeg"), ("WEBP", "image/webp"),
                                           ("GIF", "image/gif")])
def test_each_accepted_format_is_checked_and_decoded(fmt: str, mime: str) -> None:
    data = image_bytes(fmt, (40, 30))
    info = check_image(data, "image", LIMITS, declared_mime=mime)
    assert (info.mime_type, info.width, info.height) == (mime, 40, 30)
    assert decode_rgb(data, "image", LIMITS).size == (40, 30)


def test_an_animated_gif_is_read_as_its_first_frame() -> None:
    data = image_bytes("GIF", (20, 10), color=(255, 0, 0), frames=5)
    frame = decode_rgb(data, "image", LIMITS)
    assert frame.mode == "RGB" and frame.getpixel((0, 0))[0] > 200


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF"])
def test_a_truncated_file_is_refused_naming_its_part(fmt: str) -> None:
    data = truncated(image_bytes(fmt, (300, 200)))
    with pytest.raises(ParamError) as info:
        check_image(data, "messages[0].content[1]", LIMITS)
    assert info.value.field == "messages[0].content[1]"
    assert "truncated" in info.value.reason or "not a PNG" in info.value.reason


def test_bytes_that_are_no_image_are_refused() -> None:
    with pytest.raises(ParamError, match="not a PNG, JPEG, WebP or GIF"):
        inspect_image(b"<svg xmlns='http://www.w3.org/2000/svg'/>", "image", LIMITS)
    with pytest.raises(ParamError, match="not a PNG, JPEG, WebP or GIF"):
        inspect_image(image_bytes("BMP"), "image", LIMITS)  # a real image, of a format we never decode


def test_a_declared_type_that_the_bytes_contradict_is_refused() -> None:
    with pytest.raises(ParamError, match="declared image/png but the bytes are image/jpeg"):
        inspect_image(image_bytes("JPEG"), "image", LIMITS, declared_mime="image/png")
    with pytest.raises(ParamError, match="unsupported image type 'image/svg\\+xml'"):
        inspect_image(image_bytes("PNG"), "image", LIMITS, declared_mime="image/svg+xml")


def test_a_decompression_bomb_is_refused_from_its_header_without_decoding() -> None:
    bomb = png_bomb(20000, 20000)  # 48 kB on the wire, 400 million pixels decoded
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ParamError, match="more than 16777216 pixels"):
        check_image(bomb, "image", LIMITS)
    small = png_bomb(5000, 5000)  # under Pillow's own bomb check, over ours
    with pytest.raises(ParamError, match="5000x5000 pixels; the limit is 16777216"):
        decode_rgb(small, "image", LIMITS)
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 50 * 1024  # decoding it would have taken 400 MB


def test_the_byte_and_pixel_limits_are_the_configured_ones() -> None:
    data = image_bytes("PNG", (100, 100))
    with pytest.raises(ParamError, match=f"{len(data)} bytes; the limit is 100"):
        inspect_image(data, "image", ImageLimits(max_bytes=100))
    with pytest.raises(ParamError, match="100x100 pixels; the limit is 9999"):
        inspect_image(data, "image", ImageLimits(max_pixels=9999))
    assert inspect_image(data, "image", ImageLimits(max_pixels=10000)).width == 100
    with pytest.raises(ParamError, match="9 images; at most 8 per request"):
        LIMITS.check_count(9, "messages")


def test_soft_tokens_match_transformers_gemma4_image_processor_arithmetic() -> None:
    from transformers.models.gemma4.processing_gemma4 import get_aspect_ratio_preserving_size

    rng = random.Random(0)
    sizes = [(1, 1), (1, 4000), (4000, 1), (48, 48), (300, 200), (4096, 4096), (47, 3000)]
    sizes += [(rng.randint(1, 5000), rng.randint(1, 5000)) for _ in range(400)]
    for spec in (VisionSpec(), VisionSpec(max_soft_tokens=70), VisionSpec(max_soft_tokens=1120)):
        max_patches = spec.max_soft_tokens * spec.pooling_kernel_size**2
        for width, height in sizes:
            try:
                h, w = get_aspect_ratio_preserving_size(height, width, spec.patch_size, max_patches,
                                                        spec.pooling_kernel_size)
            except ValueError:
                with pytest.raises(ParamError):
                    soft_tokens(width, height, spec)
                continue
            expected = (h // spec.patch_size) * (w // spec.patch_size) // spec.pooling_kernel_size**2
            assert soft_tokens(width, height, spec) == expected, (width, height, spec)


def test_an_image_costs_its_soft_tokens_and_two_markers() -> None:
    info = inspect_image(image_bytes("PNG", (300, 200)), "image", LIMITS)
    spec = VisionSpec(max_soft_tokens=70)
    assert prompt_tokens_of(info, spec) == soft_tokens(300, 200, spec) + 2
