"""Structural-schema behaviour of the API server for custom resources: pruning, defaulting, validation.

Validation is OpenAPI v3 (via jsonschema) plus the CEL rules of `x-kubernetes-validations`, for
the subset of CEL that CRDs here use: `self.a.b`, `has(...)`, `!`, `&&`, `||`, comparisons,
arithmetic and literals. A rule outside that subset fails loudly rather than passing silently. A transition
rule (one that reads `oldSelf`) is checked on updates only, where the old object has the field, as the API
server does.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import jsonschema


class _Missing:
    def __getattr__(self, name: str) -> _Missing:
        return self


_MISSING = _Missing()


class _Node:
    """A read-only view of a JSON value for CEL field selection."""

    def __init__(self, value: Any) -> None:
        self._value = value

    def __getattr__(self, name: str) -> Any:
        if isinstance(self._value, dict) and name in self._value:
            return _wrap(self._value[name])
        return _MISSING


def _wrap(value: Any) -> Any:
    return _Node(value) if isinstance(value, dict) else value


def _has(value: Any) -> bool:
    return value is not _MISSING


_ALLOWED = re.compile(r"^[\w\s.()!&|<>=+\-*/'\",]*$")


def cel_to_python(rule: str) -> str:
    """Translate the supported CEL subset to a Python expression over `self`."""
    if not _ALLOWED.match(rule) or "__" in rule or "?" in rule:
        raise ValueError(f"CEL rule outside the emulator's subset: {rule!r}")
    expr = rule.replace("&&", " and ").replace("||", " or ")
    expr = re.sub(r"!(?!=)", " not ", expr)
    expr = re.sub(r"\btrue\b", "True", re.sub(r"\bfalse\b", "False", expr))
    return re.sub(r"\bhas\(", "_has(", expr)


def evaluate_cel(rule: str, value: Any, old: Any = None) -> bool:
    """Evaluate one rule against the value at its schema node (and the old value, for a transition rule)."""
    code = cel_to_python(rule)
    return bool(eval(code, {"__builtins__": {}}, {"self": _wrap(value), "oldSelf": _wrap(old), "_has": _has}))


_UNSET = object()


def prune(value: Any, schema: dict[str, Any]) -> Any:
    """Drop fields the schema does not know, as the API server does."""
    if isinstance(value, dict) and schema.get("type") == "object":
        if schema.get("x-kubernetes-preserve-unknown-fields"):
            return value
        properties = schema.get("properties")
        additional = schema.get("additionalProperties")
        if properties is None and isinstance(additional, dict):
            return {k: prune(v, additional) for k, v in value.items()}
        properties = properties or {}
        return {k: prune(v, properties[k]) for k, v in value.items() if k in properties}
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [prune(item, schema["items"]) for item in value]
    return value


def default(value: Any, schema: dict[str, Any]) -> Any:
    """Fill in schema defaults, outside-in, as the API server does."""
    if isinstance(value, dict):
        result = dict(value)
        for name, sub in (schema.get("properties") or {}).items():
            if name not in result and "default" in sub:
                result[name] = copy.deepcopy(sub["default"])
            if name in result:
                result[name] = default(result[name], sub)
        return result
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [default(item, schema["items"]) for item in value]
    return value


def _path(parts: Any) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _cel_errors(value: Any, schema: dict[str, Any], path: str, old: Any = _UNSET) -> list[str]:
    errors: list[str] = []
    if value is None:
        return errors
    for rule in schema.get("x-kubernetes-validations") or []:
        transition = re.search(r"\boldSelf\b", rule["rule"]) is not None
        if transition and old is _UNSET:
            continue  # a create, or a field the old object did not have
        if not evaluate_cel(rule["rule"], value, None if old is _UNSET else old):
            errors.append(
                f'{path or "<root>"}: Invalid value: "object": {rule.get("message") or rule["rule"]}'
            )
    if isinstance(value, dict):
        for name, sub in (schema.get("properties") or {}).items():
            if name in value:
                before = old.get(name, _UNSET) if isinstance(old, dict) else _UNSET
                errors += _cel_errors(value[name], sub, f"{path}.{name}" if path else name, before)
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            errors += _cel_errors(item, schema["items"], f"{path}[{index}]")
    return errors


def _draft7(node: Any) -> Any:
    """OpenAPI 3.0 boolean exclusiveMinimum/exclusiveMaximum (beside minimum/maximum) as draft 7 numbers."""
    if isinstance(node, list):
        return [_draft7(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _draft7(value) for key, value in node.items()}
    for exclusive, bound in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(out.get(exclusive), bool) and out.pop(exclusive) and bound in out:
            out[exclusive] = out.pop(bound)
    return out


def validate(obj: dict[str, Any], schema: dict[str, Any], old: dict[str, Any] | None = None) -> list[str]:
    """Field errors in the API server's wording; empty when valid (`old`: the object an update replaces)."""
    body = {k: v for k, v in obj.items() if k != "metadata"}
    errors = []
    schema = _draft7(schema)
    validator = jsonschema.Draft7Validator(
        {
            **schema,
            "properties": {k: v for k, v in (schema.get("properties") or {}).items() if k != "metadata"},
        }
    )
    for error in sorted(validator.iter_errors(body), key=lambda e: list(e.absolute_path)):
        where = _path(error.absolute_path) or "<root>"
        if error.validator == "required":
            errors.append(f"{where}: Required value: {error.message}")
        elif error.validator == "enum":
            allowed = ", ".join(f'"{v}"' for v in error.validator_value)
            errors.append(f"{where}: Unsupported value: {error.instance!r}: supported values: {allowed}")
        else:
            errors.append(f"{where}: Invalid value: {error.instance!r}: {error.message}")
    if not errors:
        before = _UNSET if old is None else {k: v for k, v in old.items() if k != "metadata"}
        errors += _cel_errors(body, schema, "", before)
    return errors
