"""Client images at the gateway: bounded, fetched or unpacked, checked off the event loop, counted in tokens.

Both front ends go through `ImageIntake`: the OpenAI API's `image_url` parts (a `data:` URL, or an `http(s)` URL
when remote images are on, see remote_images.py) and the KServe `image` tensor. Each image is checked with
`dgemma_common.images` (size, format, declared type, header dimensions, then a decode of its first frame) in a
pool of `decode_slots` processes. Not threads: Pillow's decoders hold the GIL for long stretches (a 4000 x 4000
PNG stalled a thread-sharing event loop by 100-300 ms), and a decoder that crashes on a hostile file takes only
its pool process with it. So neither a slow decode nor many large ones stall the event loop or take memory
beyond `decode_slots` decoded images. What goes on to a worker is the client's encoded bytes, never pixels.
Every refusal is a 400 naming the part.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import multiprocessing
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field

from dgemma_common.images import MIME_TYPES, ImageInfo, ImageLimits, VisionSpec, check_image, prompt_tokens_of
from dgemma_common.params import ParamError
from dgemma_gateway.errors import bad_request
from dgemma_gateway.remote_images import RemoteImages, RemoteImageSettings
from dgemma_proto.dgemma.v1 import denoiser_pb2 as pb


@dataclass(frozen=True)
class ImageSettings:
    """The gateway's image limits, remote fetching, and how many images it decodes at once."""

    limits: ImageLimits = field(default_factory=ImageLimits)
    remote: RemoteImageSettings = field(default_factory=RemoteImageSettings)
    # Decoding processes: the gateway's decode memory stays under decode_slots x max_pixels x 4 bytes.
    decode_slots: int = 2
# A pool process is replaced after this many images, so memory a decoder fragmented is given back.
IMAGES_PER_PROCESS = 200


@dataclass(frozen=True)
class ImageRef:
    """An image part of a request: where it is (for errors), its URL, and the message part its bytes go into."""

    field: str
    url: str
    target: pb.Image


def data_url_payload(url: str, field: str, max_bytes: int) -> tuple[str, str]:
    """The declared MIME type and base64 text of a `data:` URL, refused when its size is over the limit."""
    header, comma, payload = url.partition(",")
    meta = header[len("data:"):].split(";")
    mime = meta[0].strip().lower()
    if not comma or "base64" not in (m.strip().lower() for m in meta[1:]):
        raise bad_request(field, "a data: URL must be base64: data:image/png;base64,...")
    if mime not in MIME_TYPES:
        raise bad_request(field, f"unsupported image type {mime!r}; use one of {sorted(MIME_TYPES)}")
    if len(payload) > 4 * -(-max_bytes // 3):  # checked before a byte is decoded
        raise bad_request(field, f"the image is over the limit of {max_bytes} bytes")
    return mime, payload


def _unpack_and_check(payload: str | bytes, field: str, limits: ImageLimits, mime: str | None
                      ) -> tuple[bytes, ImageInfo]:
    """In a pool process: base64-decode (when `payload` is text), then check and decode the image."""
    if isinstance(payload, str):
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ParamError(field, "the data: URL is not valid base64") from None
    else:
        data = payload
    return data, check_image(data, field, limits, mime)


class ImageIntake:
    """Loads and checks the images of requests, for both front ends."""

    def __init__(self, settings: ImageSettings | None = None, remote: RemoteImages | None = None) -> None:
        self.settings = settings or ImageSettings()
        self.remote = remote or RemoteImages(self.settings.remote, self.settings.limits.max_bytes)
        self._slots: asyncio.Semaphore | None = None
        self._pool: ProcessPoolExecutor | None = None

    def _new_pool(self) -> ProcessPoolExecutor:
        """Start the decoding processes (blocking: seconds of interpreter start-up, so never on the loop)."""
        # forkserver: the gateway has threads (gRPC), which fork would copy in an unknown state.
        pool = ProcessPoolExecutor(self.settings.decode_slots, multiprocessing.get_context("forkserver"),
                                   max_tasks_per_child=IMAGES_PER_PROCESS)
        for _ in range(self.settings.decode_slots):
            pool.submit(_unpack_and_check, b"", "warm-up", self.settings.limits, None).exception()
        return pool

    async def start(self) -> None:
        """Start the decoding processes now, off the event loop, so that the first image does not wait."""
        if self._pool is None:
            self._pool = await asyncio.to_thread(self._new_pool)

    async def _processes(self) -> ProcessPoolExecutor:
        await self.start()
        assert self._pool is not None
        return self._pool

    async def close(self) -> None:
        """Close the remote-image HTTP client and the decoding processes."""
        await self.remote.close()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    async def load(self, refs: Sequence[ImageRef], where: str) -> list[ImageInfo]:
        """Fetch or unpack each image, check it, and put its bytes into its message part."""
        limits = self.settings.limits
        if len(refs) > limits.max_images:
            raise bad_request(where, f"{len(refs)} images; at most {limits.max_images} per request")
        infos = []
        for ref in refs:
            if ref.url.startswith("data:"):
                mime: str | None
                mime, payload = data_url_payload(ref.url, ref.field, limits.max_bytes)
                data, info = await self._checked(payload, ref.field, mime)
            else:
                fetched, mime = await self.remote.fetch(ref.url, ref.field)
                data, info = await self._checked(fetched, ref.field, mime)
            ref.target.data = data
            ref.target.mime_type = info.mime_type
            infos.append(info)
        return infos

    async def check(self, images: Sequence[tuple[bytes, str | None]], fields: Sequence[str], where: str
                    ) -> list[ImageInfo]:
        """Check images that arrived as bytes (the KServe `image` tensor)."""
        if len(images) > self.settings.limits.max_images:
            raise bad_request(where, f"{len(images)} images; at most {self.settings.limits.max_images} per request")
        return [(await self._checked(data, name, mime))[1] for (data, mime), name in zip(images, fields, strict=True)]

    async def _checked(self, payload: str | bytes, field: str, mime: str | None) -> tuple[bytes, ImageInfo]:
        if self._slots is None:
            # At most one image waiting per process beside the ones decoding: bounded memory in the queue too.
            self._slots = asyncio.Semaphore(2 * self.settings.decode_slots)
        async with self._slots:
            loop = asyncio.get_running_loop()
            try:
                return await loop.run_in_executor(await self._processes(), _unpack_and_check, payload, field,
                                                  self.settings.limits, mime)
            except ParamError as exc:
                raise bad_request(exc.field, exc.reason) from None
            except BrokenProcessPool:
                # A decoder died on this (or a concurrent) image; a fresh pool serves the next ones.
                self._pool = None
                raise bad_request(field, "the image could not be decoded") from None


def image_tokens(infos: Sequence[ImageInfo], fields: Sequence[str], spec: VisionSpec) -> int:
    """Prompt tokens the images take on a model with this geometry; 400 naming an image the model cannot take."""
    try:
        return sum(prompt_tokens_of(info, spec, name) for info, name in zip(infos, fields, strict=True))
    except ParamError as exc:
        raise bad_request(exc.field, exc.reason) from None
