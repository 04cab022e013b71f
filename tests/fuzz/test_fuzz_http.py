"""Schemathesis against the gateway's own OpenAPI document (served at /openapi.json): every operation, with
requests that follow the schema (positive) and requests that break it (negative), half of them naming the served
model so that they reach the worker. Invariants: no 5xx, neither as a status nor as an error event inside a
stream; a request that breaks the schema is refused with a 4xx; afterwards both processes healthy and not grown
beyond a bound."""

from __future__ import annotations

import json
from typing import Any

import pytest
import schemathesis
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import negative_data_rejection, not_a_server_error
from schemathesis.core.parameters import ParameterLocation

from dgemma_common.openai_models import Name
from tests.fuzz.conftest import API_KEY, FUZZ, MODEL, FuzzStack, describe

pytestmark = pytest.mark.timeout(300)

# The schema's bounds on a model name (`Name` in dgemma_common.openai_models).
NAME_BOUNDS = Name.__metadata__[0]

# Streams are short on the fuzzed stack; a client timeout means a hang.
CALL_TIMEOUT_S = 30.0


def _stream_errors(text: str) -> list[dict[str, Any]]:
    """Error events inside a server-sent event stream."""
    errors = []
    for line in text.splitlines():
        if line.startswith("data: {"):
            data = json.loads(line[len("data: "):])
            if isinstance(data, dict) and "error" in data:
                errors.append(data["error"])
    return errors


def _name_the_model(case: Any, use: bool) -> None:
    """The served model in place of a generated name, so that the request reaches the worker. Only a name the
    schema allows is replaced: where `model` is what a negative case breaks,
    replacing it would repair the case, which then gets a 200 where a refusal is asserted."""
    if not (use and isinstance(case.body, dict)):
        return
    name = case.body.get("model")
    if isinstance(name, str) and NAME_BOUNDS.min_length <= len(name) <= NAME_BOUNDS.max_length:
        case.body["model"] = MODEL


def _authorize(case: Any) -> None:
    """The real key in place of the generated one, unless the case breaks the headers on purpose (then it
    must get a 401)."""
    components = case.meta.components if case.meta is not None else {}
    if components.get(ParameterLocation.HEADER) is not GenerationMode.NEGATIVE and "Authorization" in case.headers:
        case.headers["Authorization"] = f"Bearer {API_KEY}"


def _asks_for_a_short_deadline(body: Any) -> bool:
    """The body sets its own `timeout_s`, shorter than the client waits."""
    timeout_s = body.get("timeout_s") if isinstance(body, dict) else None
    return isinstance(timeout_s, int | float) and not isinstance(timeout_s, bool) and 0 < timeout_s < CALL_TIMEOUT_S


def _error_code(response: Any) -> Any:
    try:
        return response.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None


def _fuzz_operation(stack: FuzzStack, operation: Any, mode: GenerationMode) -> None:
    url = stack.gateway.url
    surface = f"gateway {operation.label} ({mode.value})"
    checks = [not_a_server_error, negative_data_rejection] if mode is GenerationMode.NEGATIVE else [not_a_server_error]

    @FUZZ
    @given(case=operation.as_strategy(generation_mode=mode), use_model=st.booleans())
    def one(case: Any, use_model: bool) -> None:
        _name_the_model(case, use_model)
        _authorize(case)
        response = case.call(base_url=url, timeout=CALL_TIMEOUT_S)
        stack.count(surface, str(response.status_code))
        shown = f"{case.method} {case.formatted_path} {describe(case.body)} headers={describe(case.headers)}"
        own_deadline = _asks_for_a_short_deadline(case.body)
        # The request's own timeout_s ran out before its work did: the answer it asked for, whether it ran out at a
        # worker (`upstream_timeout`) or before any endpoint took it (`timeout`: a timeout_s of 1e-88 has passed by
        # the time routing is done).
        if own_deadline and response.status_code == 504 and _error_code(response) in ("upstream_timeout", "timeout"):
            return
        assert response.status_code < 500, f"{response.status_code} {response.text[:300]} for {shown}"
        case.validate_response(response, checks=checks)
        if response.headers.get("Content-Type", "").startswith("text/event-stream"):
            bad = [e for e in _stream_errors(response.text)
                   if e.get("type") in ("server_error", "service_unavailable")
                   or (e.get("type") == "timeout" and not own_deadline)]
            assert not bad, f"error events {bad} in the stream for {shown}"

    try:
        one()
    except Unsatisfiable:
        assert mode is GenerationMode.NEGATIVE  # an operation without inputs has no way to break its schema


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
def test_no_operation_of_the_openapi_document_answers_a_5xx(fuzz_stack: FuzzStack, mode: GenerationMode) -> None:
    schema = schemathesis.openapi.from_url(f"{fuzz_stack.gateway.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert operations, "the document has operations"
    for operation in operations:
        _fuzz_operation(fuzz_stack, operation, mode)
    fuzz_stack.check_invariants()
