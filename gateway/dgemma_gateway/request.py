"""One generation request as the gateway carries it, whichever front end it came from."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from dgemma_common.tracing import current_or_new_request_id
from dgemma_proto.dgemma.v1 import denoiser_pb2 as pb


@dataclass(frozen=True)
class GatewayRequest:
    """One generation request, whichever front end it came from."""

    model: str
    prompt: pb.Prompt
    settings: Mapping[str, Any]  # validated GenerationParams fields the client set (max_new_tokens always)
    latency_target_ms: float | None = None
    strict: bool | None = None
    timeout_s: float | None = None
    request_id: str = field(default_factory=current_or_new_request_id)  # the client's x-request-id, if valid
    api: str = "openai"
    param_names: Mapping[str, str] = field(default_factory=dict)  # worker field -> client field, for 400s
    allow_overflow: bool = True  # False: the caller's key forbids sending it to an external API
    prompt_tokens: int = 0  # the prompt's length as far as the gateway knows it, images included (0: unknown)
    # Filled in by the gateway as it routes: endpoint, variant, target and prediction (for headers and logs).
    trace: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def max_tokens(self) -> int:
        """The completion budget."""
        return int(self.settings["max_new_tokens"])

    def client_field(self, name: str) -> str:
        """The name the client used for a generation setting (e.g. max_tokens for max_new_tokens)."""
        return self.param_names.get(name, name)
