"""Hypothesis strategies for protobuf messages, read from their descriptors: every field of every type, with
the values a hostile client would pick (extremes of each integer width, NaN and infinities, unknown enum
numbers, deep nesting, several members of a oneof), and chosen values for the fields that steer a server
deep into its code (a model name it serves, the tensor names and datatypes it knows)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import strategies as st

Overrides = Mapping[str, st.SearchStrategy[Any]]

_INT_BITS = {
    FieldDescriptor.TYPE_INT32: (True, 32), FieldDescriptor.TYPE_SINT32: (True, 32),
    FieldDescriptor.TYPE_SFIXED32: (True, 32), FieldDescriptor.TYPE_INT64: (True, 64),
    FieldDescriptor.TYPE_SINT64: (True, 64), FieldDescriptor.TYPE_SFIXED64: (True, 64),
    FieldDescriptor.TYPE_UINT32: (False, 32), FieldDescriptor.TYPE_FIXED32: (False, 32),
    FieldDescriptor.TYPE_UINT64: (False, 64), FieldDescriptor.TYPE_FIXED64: (False, 64),
}
MAX_DEPTH = 4
MAX_ITEMS = 4


def _integers(signed: bool, bits: int) -> st.SearchStrategy[int]:
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    edges = [v for v in (lo, hi, 0, 1, -1, 2**31 - 1, 2**31, 2**40) if lo <= v <= hi]
    return st.one_of(st.sampled_from(edges), st.integers(lo, hi), st.integers(max(lo, -3), min(hi, 300)))


def _scalar(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    t = field.type
    if t in _INT_BITS:
        return _integers(*_INT_BITS[t])
    if t == FieldDescriptor.TYPE_DOUBLE:
        return st.floats(allow_nan=True, allow_infinity=True)
    if t == FieldDescriptor.TYPE_FLOAT:
        return st.floats(allow_nan=True, allow_infinity=True, width=32)
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t == FieldDescriptor.TYPE_STRING:
        return st.text(max_size=64)
    if t == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    if t == FieldDescriptor.TYPE_ENUM:
        known = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(known), st.integers(-(2**31), 2**31 - 1))  # proto3 enums are open
    raise TypeError(f"no strategy for field {field.full_name} of type {t}")


def _value(field: FieldDescriptor, depth: int, overrides: Overrides) -> st.SearchStrategy[Any]:
    if field.full_name in overrides:
        return overrides[field.full_name]
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return messages(field.message_type, overrides, depth + 1)
    return _scalar(field)


def _field(field: FieldDescriptor, depth: int, overrides: Overrides) -> st.SearchStrategy[Any]:
    if field.full_name in overrides and field.label == FieldDescriptor.LABEL_REPEATED:
        return overrides[field.full_name]  # an override of a repeated field gives the whole list
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        key, value = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
        return st.dictionaries(_value(key, depth, overrides), _value(value, depth, overrides), max_size=MAX_ITEMS)
    if field.label == FieldDescriptor.LABEL_REPEATED:
        return st.lists(_value(field, depth, overrides), max_size=MAX_ITEMS)
    return _value(field, depth, overrides)


def _assign(message: Message, field: FieldDescriptor, value: Any) -> None:
    target = getattr(message, field.name)
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        for k, v in value.items():
            if field.message_type.fields_by_name["value"].type == FieldDescriptor.TYPE_MESSAGE:
                target[k].CopyFrom(v)
            else:
                target[k] = v
    elif field.label == FieldDescriptor.LABEL_REPEATED:
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            for item in value:
                target.add().CopyFrom(item)
        else:
            target.extend(value)
    elif field.type == FieldDescriptor.TYPE_MESSAGE:
        target.CopyFrom(value)
    else:
        setattr(message, field.name, value)


def messages(descriptor: Descriptor, overrides: Overrides | None = None, depth: int = 0) -> st.SearchStrategy[Any]:
    """Messages of this type; nested messages stop at MAX_DEPTH (deeper ones are left unset)."""
    overrides = overrides or {}
    cls = GetMessageClass(descriptor)
    if depth > MAX_DEPTH:
        return st.just(cls())
    # Deferred, so recursive message types build their strategy only as deep as drawn.
    optional = {f.name: st.deferred(lambda f=f: _field(f, depth, overrides)) for f in descriptor.fields}

    def build(values: dict[str, Any]) -> Message:
        message = cls()
        for name, value in values.items():
            _assign(message, descriptor.fields_by_name[name], value)  # a later oneof member wins, as on the wire
        return message

    return st.fixed_dictionaries({}, optional=optional).map(build)
