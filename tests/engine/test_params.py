"""Every request knob is range-checked, and a bad value names its field."""

from __future__ import annotations

from typing import Any

import pytest

from dgemma_common.params import GenerationParams, Limits, ParamError, params_from_mapping

BAD_VALUES: list[tuple[str, Any, str]] = [
    ("max_new_tokens", 0, "[1, 8192]"),
    ("max_new_tokens", 8193, "[1, 8192]"),
    ("max_new_tokens", 1.5, "integer"),
    ("max_new_tokens", True, "integer"),
    ("max_denoising_steps", 0, "[1, 256]"),
    ("max_denoising_steps", 257, "[1, 256]"),
    ("max_denoising_steps", "8", "integer"),
    ("t_min", 0.0, "(0.0, 10.0]"),
    ("t_min", -1.0, "(0.0, 10.0]"),
    ("t_max", float("nan"), "finite"),
    ("t_max", 11.0, "(0.0, 10.0]"),
    ("entropy_bound", 0.0, "(0.0"),
    ("entropy_bound", "a", "finite number"),
    ("stability_threshold", -1, "[0, 64]"),
    ("stability_threshold", 65, "[0, 64]"),
    ("confidence_threshold", 0.0, "(0.0"),
    ("confidence_threshold", float("inf"), "finite"),
    ("seed", -1, "[0, 9223372036854775807]"),
    ("seed", 2**63, "[0, 9223372036854775807]"),
    ("draft_interval_s", -0.1, "[0.0, 60.0]"),
    ("stream_drafts", 1, "boolean"),
    ("ignore_eos", "yes", "boolean"),
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


@pytest.mark.parametrize("stop", [[""], ["x" * 257], ["a"] * 17, [3]])
def test_bad_stop_strings_are_rejected(stop: list[Any]) -> None:
    with pytest.raises(ParamError) as err:
        params_from_mapping({"stop": stop})
    assert err.value.field == "stop"


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
