"""The OpenAPI 3.1 document of the gateway's HTTP API (served at /openapi.json)."""

from __future__ import annotations

from typing import Any

_ERROR = {"$ref": "#/components/schemas/Error"}
_KNOBS: dict[str, Any] = {
    "max_denoising_steps": {"type": "integer", "minimum": 1, "description": "Upper bound on steps per canvas."},
    "t_min": {"type": "number", "description": "Final sampling temperature of the schedule."},
    "t_max": {"type": "number", "description": "Initial sampling temperature of the schedule."},
    "entropy_bound": {"type": "number", "description": "Entropy bound for accepting tokens per step."},
    "stability_threshold": {"type": "integer", "description": "Stable steps before a canvas may stop."},
    "confidence_threshold": {"type": "number", "description": "Mean entropy below which a canvas may stop."},
    "seed": {"type": "integer", "minimum": 0, "description": "Reproducible sampling."},
    "stop": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
    "stream_drafts": {"type": "boolean", "description": "Stream `dgemma.draft` events (the canvas as it denoises)."},
    "draft_interval_s": {"type": "number", "description": "At most one draft per interval."},
    "ignore_eos": {"type": "boolean"},
    "latency_target_ms": {"type": "number", "description": "End-to-end target; header x-dgemma-latency-target-ms."},
    "latency_strict": {"type": "boolean", "description": "429 instead of a predicted miss."},
    "timeout_s": {"type": "number", "description": "Deadline of the request (504 when it passes upstream)."},
    "max_tokens": {"type": "integer", "minimum": 1},
    "max_completion_tokens": {"type": "integer", "minimum": 1},
    "n": {"type": "integer", "minimum": 1},
    "stream": {"type": "boolean"},
    "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
    "model": {"type": "string"},
}


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


_GEN_ERRORS = (400, 401, 404, 413, 429, 503, 504)


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
                "ChatCompletionRequest": {"type": "object", "required": ["model", "messages"], "properties": {
                    **_KNOBS, "messages": {"type": "array", "items": {"type": "object", "properties": {
                        "role": {"enum": ["system", "developer", "user", "assistant"]},
                        "content": {"oneOf": [{"type": "string"}, {"type": "array"}]}}}}}},
                "CompletionRequest": {"type": "object", "required": ["model", "prompt"], "properties": {
                    **_KNOBS, "prompt": {"oneOf": [{"type": "string"},
                                                   {"type": "array", "items": {"type": "integer"}}]}}},
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
