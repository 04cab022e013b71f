"""Image files for tests, made here: valid ones of every accepted format, and hostile ones."""

from __future__ import annotations

import io
import struct
import zlib

from PIL import Image


def image_bytes(fmt: str = "PNG", size: tuple[int, int] = (64, 48), color: tuple[int, int, int] = (200, 30, 60),
                frames: int = 1) -> bytes:
    """An image file of `size` in `fmt` (PNG, JPEG, WEBP or GIF); GIF and WEBP may be animated."""
    out = io.BytesIO()
    first = Image.new("RGB", size, color)
    if frames > 1:
        rest = [Image.new("RGB", size, (i * 40 % 255, 0, 0)) for i in range(1, frames)]
        first.save(out, fmt, save_all=True, append_images=rest)
    else:
        first.save(out, fmt)
    return out.getvalue()


def png_bomb(width: int = 20000, height: int = 20000) -> bytes:
    """A valid PNG of width x height black pixels (1 bit each) that compresses to a few tens of kilobytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer = zlib.compressobj(9)
    row = b"\0" * (1 + -(-width // 8))
    body = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def truncated(data: bytes, keep: float = 0.6) -> bytes:
    """The first part of a file, as a broken upload leaves it."""
    return data[: int(len(data) * keep)]
