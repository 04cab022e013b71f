"""Compressed request bodies (Content-Encoding) through a real gateway and worker, sent with aiohttp: gzip and
deflate are served, a decompression bomb is refused without its expansion in memory, a corrupt or cut stream is
a 400 naming Content-Encoding and an encoding the gateway does not decode a 415, all as OpenAI-shaped JSON."""

from __future__ import annotations

import asyncio
import gzip
import json
import zlib
from typing import Any

import aiohttp
import pytest

from dgemma_gateway.content_encoding import decode_body
from dgemma_gateway.errors import GatewayError
from dgemma_gateway.openai_api import ApiLimits
from tests.gateway.gateway_harness import MODEL, RunningGateway, fast_gateway
from tests.procmem import peak_rss_growth

pytestmark = pytest.mark.timeout(180)

gw = pytest.fixture(scope="module", name="gw")(fast_gateway)
BODY = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
                   "max_denoising_steps": 2}).encode()


def post(gw: RunningGateway, data: bytes, encoding: str) -> tuple[int, dict[str, Any]]:
    async def go() -> tuple[int, dict[str, Any]]:
        headers = {"Content-Type": "application/json", "Content-Encoding": encoding}
        async with aiohttp.ClientSession() as s, s.post(f"{gw.url}/v1/chat/completions", data=data,
                                                        headers=headers) as r:
            return r.status, await r.json()

    return asyncio.run(go())


def raw_deflate(data: bytes) -> bytes:
    c = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return c.compress(data) + c.flush()


@pytest.mark.parametrize(("encoding", "data"), [
    ("gzip", gzip.compress(BODY)),
    ("x-gzip", gzip.compress(BODY)),
    ("GZIP", gzip.compress(BODY[:20]) + gzip.compress(BODY[20:])),  # two gzip members, one after the other
    ("deflate", zlib.compress(BODY)),  # what HTTP's deflate means (a zlib stream)
    ("deflate", raw_deflate(BODY)),  # what some clients send as deflate
    ("identity", BODY),
])
def test_gzip_and_deflate_bodies_are_served(gw: RunningGateway, encoding: str, data: bytes) -> None:
    status, body = post(gw, data, encoding)
    assert status == 200, body
    assert body["choices"][0]["finish_reason"] in ("stop", "length")


def test_a_decompression_bomb_is_refused_without_its_expansion_in_memory(gw: RunningGateway) -> None:
    # 128 MiB of text in ~130 KB of gzip, a thousandfold: the gateway stops one byte past its 16 MiB limit. It
    # used to buffer the whole expansion before refusing it (peak memory up by ~2x the expansion).
    expansion = 128 << 20
    c = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    bomb = c.compress(BODY[:-1] + b', "user": "') + c.compress(b"a" * expansion) + c.compress(b'"}') + c.flush()
    assert len(bomb) < 200_000
    with peak_rss_growth() as growth:  # the gateway runs in this process, on its own thread
        status, body = post(gw, bomb, "gzip")
    assert (status, body["error"]["code"]) == (413, "body_too_large"), body
    assert growth.mib < 64, f"peak memory grew {growth.mib:.0f} MiB for a {len(bomb) // 1024} KiB body"


@pytest.mark.parametrize(("encoding", "data", "why"), [
    ("gzip", b"not gzip at all", "not valid gzip"),
    ("gzip", gzip.compress(BODY)[:-12], "ends before its end"),  # cut short
    ("deflate", zlib.compress(BODY) + b"trailing", "bytes after"),
    ("gzip", b"", "empty"),
])
def test_a_corrupt_or_cut_stream_is_a_400_naming_content_encoding(gw: RunningGateway, encoding: str, data: bytes,
                                                                    why: str) -> None:
    status, body = post(gw, data, encoding)  # a corrupt gzip stream was a 500
    assert status == 400, body
    assert body["error"]["param"] == "Content-Encoding" and why in body["error"]["message"], body


@pytest.mark.parametrize("encoding", ["br", "zstd", "compress", "gzip, deflate", "x-made-up"])
def test_an_encoding_the_gateway_does_not_decode_is_a_415_before_the_body_is_read(gw: RunningGateway,
                                                                                   encoding: str) -> None:
    # br was aiohttp's plain-text 400 ("Please install `Brotli`"); a made-up one was read as if not compressed.
    status, body = post(gw, BODY, encoding)
    assert status == 415, body
    assert (body["error"]["param"], body["error"]["code"]) == ("Content-Encoding", "unsupported_media_type")


def test_the_limit_applies_to_the_body_as_decompressed() -> None:
    limit = ApiLimits().max_body_bytes
    assert decode_body(gzip.compress(b"x" * limit), "gzip", limit) == b"x" * limit  # at the limit: served
    with pytest.raises(GatewayError) as info:
        decode_body(gzip.compress(b"x" * (limit + 1)), "gzip", limit)
    assert info.value.status == 413
