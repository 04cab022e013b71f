"""What each runtime honours of a request's generation settings, and under which OpenAI field it takes them.

dgemma workers take every setting (`dgemma_common.params`). A vLLM server takes the budget, stop strings and
ignore_eos per request; its diffusion settings are fixed when it starts (`dgemma_common.vllm`). An external API
is any OpenAI-compatible service: it takes OpenAI's own fields (max_tokens, stop, seed) and nothing
DiffusionGemma-specific. A setting that only paces drafts is moot where a stream carries no drafts. Prompts
with images go only to dgemma workers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dgemma_common import vllm
from dgemma_gateway.types import Runtime
from dgemma_proto.dgemma.v1 import denoiser_pb2 as pb

OPENAI_FIELDS: dict[Runtime, dict[str, str]] = {
    "dgemma": {},
    "vllm": dict(vllm.PER_REQUEST),
    "external": {"max_new_tokens": "max_tokens", "stop": "stop", "seed": "seed"},
}
EXTERNAL_REFUSAL = "an external API is a plain OpenAI-compatible service and takes no DiffusionGemma settings"
# Images reach only dgemma workers: the HTTP upstreams are forwarded text (`openai_upstream.request_body`).
IMAGE_RUNTIMES: frozenset[Runtime] = frozenset({"dgemma"})
IMAGE_REFUSAL = "images are served by dgemma workers only, and this model has none (its vLLM or external " \
                "variants take text)"


def has_images(prompt: pb.Prompt) -> bool:
    """Whether a prompt carries images (a text prompt's own, or image parts of its chat messages)."""
    if prompt.images:
        return True
    return prompt.WhichOneof("kind") == "chat" and any(
        p.HasField("image") for m in prompt.chat.messages for p in m.parts)


def refusal(runtime: Runtime, settings: Mapping[str, Any]) -> tuple[str, str] | None:
    """(setting, why) for the first setting this runtime cannot honour; None when it honours them all."""
    if runtime == "dgemma":
        return None
    taken = OPENAI_FIELDS[runtime]
    for name in sorted(settings):
        if name in taken or name in vllm.STREAM_ONLY:
            continue
        if runtime == "vllm":
            why = vllm.SERVER_LEVEL.get(name, "vLLM has no such per-request setting")
            return name, f"a vLLM {vllm.VERSION} variant cannot take it per request: {why}"
        return name, EXTERNAL_REFUSAL
    return None


def openai_settings(runtime: Runtime, settings: Mapping[str, Any]) -> dict[str, Any]:
    """The settings as OpenAI request fields (those `refusal` accepts; drafts-only ones left out)."""
    taken = OPENAI_FIELDS[runtime]
    return {taken[name]: value for name, value in settings.items() if name in taken}
