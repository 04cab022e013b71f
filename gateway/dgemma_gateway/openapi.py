"""The OpenAPI 3.1 document of the gateway's HTTP API (served at /openapi.json).

The request bodies' schemas are generated from the pydantic models that validate them
(`dgemma_common.openai_models`), so the document and the validation cannot disagree.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from pydantic.json_schema import models_json_schema

from dgemma_common.openai_models import ChatCompletionRequest, CompletionRequest

_ERROR = {"$ref": "#/components/schemas/Error"}


def request_schemas() -> dict[str, Any]:
    """JSON Schemas of the request bodies, generated from the models that validate them."""
    _, top = models_json_schema([(ChatCompletionRequest, "validation"), (CompletionRequest, "validation")],
                                ref_template="#/components/schemas/{model}")
    return dict(top["$defs"])


def _op(summary: str, body: str | None, ok: str, errors: tuple[int, ...]) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": summary,
        "responses": {
            "200": {"description": ok},
            **{str(code): {"description": "error", "content": {"application/json": {"schema": _ERROR}}}
               for code in errors},
        },
    }
    if body is not None:
        op["requestBody"] = {"required": True,
                             "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{body}"}}}}
    return op


_GEN_ERRORS = (400, 401, 404, 413, 415, 429, 503, 504)


@cache
def openapi_document() -> dict[str, Any]:
    """The document."""
    return {
        "openapi": "3.1.0",
        "info": {"title": "dgemma gateway", "version": "1",
                 "description": "OpenAI-compatible API for DiffusionGemma. See docs/gateway.md."},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {"type": "object", "properties": {"error": {"type": "object", "properties": {
                    "message": {"type": "string"}, "type": {"type": "string"},
                    "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}},
                **request_schemas(),
            },
        },
        "security": [{"bearer": []}],
        "paths": {
            "/v1/chat/completions": {"post": _op(
                "Chat completion (stream: true gives server-sent events)", "ChatCompletionRequest",
                "chat.completion, or text/event-stream of chat.completion.chunk", _GEN_ERRORS)},
            "/v1/completions": {"post": _op(
                "Text completion (stream: true gives server-sent events)", "CompletionRequest",
                "text_completion, or text/event-stream", _GEN_ERRORS)},
            "/v1/models": {"get": _op("Served models", None, "list of models", (401,))},
            "/v1/models/{model}": {"get": _op("One served model", None, "model", (401, 404))},
            "/v1/dgemma/demand": {"get": {**_op("Per-variant demand and delivered tokens/s (autoscaler input)",
                                                None, "JSON", ()), "security": []}},
            "/healthz": {"get": {**_op("Liveness", None, "ok", ()), "security": []}},
            "/readyz": {"get": {**_op("Readiness: some endpoint is ready", None, "ready", (503,)), "security": []}},
            "/metrics": {"get": {**_op("Prometheus metrics", None, "text format", ()), "security": []}},
        },
    }
