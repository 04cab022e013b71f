"""Every request knob is range-checked, and a bad value names its field."""

from __future__ import annotations

from typing import Any

import pytest

from dgemma_common.params import GenerationParams, Limits, ParamError, params_from_mapping

BAD_VALUES: list[tuple[str, Any, str]] = [
    ("max_new_tokens", 0, "greater than or equal to 1"),
    ("max_new_tokens", 8193, "[1, 8192]"),  # the server's limit
    ("max_new_tokens", 1.5, "valid integer"),
    ("max_new_tokens", True, "valid integer"),  # strict: a bool is not an integer
    ("max_denoising_steps", 0, "greater than or equal to 1"),
    ("max_denoising_steps", 257, "[1, 256]"),
    ("max_denoising_steps", "8", "valid integer"),  # strict: a string is not a number
    ("t_min", 0.0, "greater than 0"),
    ("t_min", -1.0, "greater than 0"),
    ("t_max", float("nan"), "finite number"),
    ("t_max", 11.0, "less than or equal to 10"),
    ("entropy_bound", 0.0, "greater than 0"),
    ("entropy_bound", "a", "valid number"),
    ("stability_threshold", -1, "greater than or equal to 0"),
    ("stability_threshold", 65, "less than or equal to 64"),
    ("confidence_threshold", 0.0, "greater than 0"),
    ("confidence_threshold", float("inf"), "finite number"),
    ("seed", -1, "greater than or equal to 0"),
    ("seed", 2**63, "less than or equal to 9223372036854775807"),
    ("draft_interval_s", -0.1, "greater than or equal to 0"),
    ("stream_drafts", 1, "valid boolean"),
    ("ignore_eos", "yes", "valid boolean"),
]


@pytest.mark.parametrize(("field", "value", "range_text"), BAD_VALUES)
def test_a_bad_value_is_rejected_with_its_field_and_range(field: str, value: Any, range_text: str) -> None:
    with pytest.raises(ParamError) as err:
        params_from_mapping({field: value})
    assert err.value.field == field
    assert str(err.value).startswith(f"{field}: ")
    assert range_text in str(err.value)


def test_defaults_are_the_published_ones_and_valid() -> None:
    p = GenerationParams().validated()
    assert (p.max_denoising_steps, p.t_min, p.t_max, p.entropy_bound) == (48, 0.4, 0.8, 0.1)
    assert (p.stability_threshold, p.confidence_threshold) == (1, 0.005)


def test_t_max_below_t_min_is_rejected_naming_t_max() -> None:
    with pytest.raises(ParamError) as err:
        params_from_mapping({"t_min": 0.8, "t_max": 0.4})
    assert err.value.field == "t_max"


def test_an_unknown_setting_is_named() -> None:
    with pytest.raises(ParamError) as err:
        params_from_mapping({"max_steps": 3})
    assert err.value.field == "max_steps"


@pytest.mark.parametrize(("stop", "field"), [([""], "stop[0]"), (["x" * 257], "stop[0]"), (["a"] * 17, "stop"),
                                             ([3], "stop[0]"), (["ok", 3], "stop[1]"), ({"a": 1}, "stop")])
def test_bad_stop_strings_are_rejected_naming_the_one(stop: Any, field: str) -> None:
    with pytest.raises(ParamError) as err:
        params_from_mapping({"stop": stop})
    assert err.value.field == field


def test_a_single_stop_string_becomes_a_tuple_and_ints_become_floats_where_needed() -> None:
    p = params_from_mapping({"stop": "END", "t_min": 1, "t_max": 2, "seed": 7})
    assert p.stop == ("END",)
    assert p.seed == 7
    assert p.validated() is p


def test_server_limits_bound_what_a_request_may_ask_for() -> None:
    limits = Limits(max_new_tokens=100, max_denoising_steps=16)
    with pytest.raises(ParamError, match=r"max_new_tokens: must be in \[1, 100\]"):
        params_from_mapping({"max_new_tokens": 101}, limits=limits)
    with pytest.raises(ParamError, match="max_denoising_steps"):
        params_from_mapping({"max_new_tokens": 10, "max_denoising_steps": 17}, limits=limits)


def test_none_values_keep_the_base_defaults() -> None:
    base = GenerationParams(max_denoising_steps=12)
    assert params_from_mapping({"max_denoising_steps": None}, base=base).max_denoising_steps == 12


def test_one_model_defines_the_settings_of_every_api() -> None:
    # The engine's params, the client-facing settings and the worker contract name the same fields.
    from dataclasses import fields

    from dgemma_common.params import FIELD_NAMES, GenerationSettings
    from dgemma_proto.dgemma.v1 import denoiser_pb2 as pb

    assert {f.name for f in fields(GenerationParams)} == FIELD_NAMES == set(GenerationSettings.model_fields)
    assert set(pb.GenerationParams.DESCRIPTOR.fields_by_name) == FIELD_NAMES


def test_settings_round_trip_through_protobuf_keeping_only_what_was_set() -> None:
    from dgemma_common.convert import settings_from_pb, settings_to_pb
    from dgemma_common.params import GenerationSettings

    given = GenerationSettings.parse({"max_new_tokens": 7, "stop": "END", "t_min": 1, "ignore_eos": True}).given()
    assert given == {"max_new_tokens": 7, "stop": ("END",), "t_min": 1.0, "ignore_eos": True}
    assert settings_from_pb(settings_to_pb(given)).given() == given


def test_a_huge_bad_value_is_shown_short_and_escaped() -> None:
    with pytest.raises(ParamError) as err:
        params_from_mapping({"seed": "\x1b[2J\n" + "x" * 10**6})
    assert len(str(err.value)) < 200 and "\x1b" not in str(err.value) and "\n" not in str(err.value)
