"""`dgemma worker` settings: flags win over the operator's environment variables, which win over defaults."""

from __future__ import annotations

from dataclasses import replace

import pytest

from dgemma_worker.checkpoints import BUNDLED_MODEL_DIR
from dgemma_worker.model import tiny_model_dir
from dgemma_worker.worker_config import METRICS_OFF, parse_config


def test_environment_sets_everything_and_flags_win() -> None:
    env = {
        "DGEMMA_MODEL": "/models/google/diffusiongemma-26B-A4B-it/",
        "DGEMMA_PORT": "6000",
        "DGEMMA_METRICS_PORT": "off",
        "DGEMMA_MAX_ACTIVE": "3",
        "DGEMMA_MAX_QUEUE": "5",
        "DGEMMA_DTYPE": "bfloat16",
        "DGEMMA_DEVICE": "cuda:0",
        "DGEMMA_DRAIN_GRACE_S": "12.5",
        "DGEMMA_LOG_FORMAT": "json",
        "DGEMMA_HOST": "127.0.0.1",
        "DGEMMA_MODEL_REVISION": "abc123",
        "DGEMMA_DEFAULT_MAX_DENOISING_STEPS": "16",
        "DGEMMA_DEFAULT_T_MIN": "0.3",
        "DGEMMA_DEFAULT_T_MAX": "0.9",
        "DGEMMA_DEFAULT_ENTROPY_BOUND": "0.2",
        "DGEMMA_DEFAULT_STABILITY_THRESHOLD": "2",
        "DGEMMA_DEFAULT_CONFIDENCE_THRESHOLD": "0.01",
        "DGEMMA_MAX_DENOISING_STEPS": "32",
    }
    cfg = parse_config(["--port", "7000", "--max-queue", "9"], env)
    assert cfg.limits.max_denoising_steps == 32
    assert (cfg.port, cfg.max_queue, cfg.max_active) == (7000, 9, 3)
    assert cfg.metrics_port == METRICS_OFF and cfg.host == "127.0.0.1"
    assert (cfg.dtype, cfg.device, cfg.drain_grace_s, cfg.log_format) == ("bfloat16", "cuda:0", 12.5, "json")
    assert cfg.model_name == "diffusiongemma-26B-A4B-it" and cfg.model_revision == "abc123"
    assert cfg.default_overrides == {"max_denoising_steps": 16, "t_min": 0.3, "t_max": 0.9, "entropy_bound": 0.2,
                                     "stability_threshold": 2, "confidence_threshold": 0.01}


def test_without_a_model_the_bundled_trained_checkpoint_is_served() -> None:
    cfg = parse_config([], {})
    assert cfg.model == str(BUNDLED_MODEL_DIR) and cfg.model_name == "dgemma-tiny"
    assert (BUNDLED_MODEL_DIR / "model.safetensors").is_file()


def test_defaults_and_served_model_name() -> None:
    cfg = parse_config(["--model", "google/diffusiongemma-26B-A4B-it"], {"DGEMMA_SERVED_MODEL_NAME": "dg"})
    assert (cfg.port, cfg.metrics_port, cfg.max_active, cfg.max_queue) == (50051, 9090, 4, 16)
    assert cfg.host == "0.0.0.0" and cfg.model_name == "dg"


@pytest.mark.parametrize(
    ("argv", "env"),
    [
        (["--model", "m"], {"DGEMMA_MAX_ACTIVE": "many"}),
        (["--model", "m", "--max-active", "0"], {}),
        (["--model", "m"], {"DGEMMA_DEFAULT_T_MIN": "-1"}),
        (["--model", "m"], {"DGEMMA_LOG_FORMAT": "yaml"}),
    ],
)
def test_bad_settings_are_usage_errors(argv: list[str], env: dict[str, str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse_config(argv, env)
    assert info.value.code == 2


def test_a_slow_worker_is_chosen_at_load_time_not_in_the_step_loop() -> None:
    """The gateway and e2e tests make slow workers with DGEMMA_DEBUG_STEP_DELAY_S; it picks the runner."""
    from dgemma_worker.runner import DelayedStepRunner, StepRunner
    from dgemma_worker.server import load_engine

    assert parse_config(["--model", "m"], {}).debug_step_delay_s == 0.0
    slow = parse_config(["--model", str(tiny_model_dir()), "--no-warmup"], {"DGEMMA_DEBUG_STEP_DELAY_S": "0.02"})
    assert slow.debug_step_delay_s == 0.02
    for cfg, runner_type in ((slow, DelayedStepRunner), (replace(slow, debug_step_delay_s=0.0), StepRunner)):
        engine = load_engine(cfg, None)
        try:
            assert type(engine.runner) is runner_type  # type: ignore[attr-defined]
        finally:
            engine.shutdown()
    with pytest.raises(SystemExit):
        parse_config(["--model", "m", "--debug-step-delay-s", "-1"], {})


def test_the_compiled_step_is_chosen_at_load_time_both_with_grouped_mm_experts() -> None:
    from dgemma_worker.runner import StepRunner
    from dgemma_worker.server import load_engine
    from dgemma_worker.static import CompiledStepRunner

    assert parse_config(["--model", "m"], {}).compile is None  # on with CUDA, off on a CPU
    assert parse_config(["--model", "m", "--compile"], {"DGEMMA_COMPILE": "false"}).compile is True
    assert parse_config(["--model", "m"], {"DGEMMA_COMPILE": "false"}).compile is False
    with pytest.raises(SystemExit):
        parse_config(["--model", "m"], {"DGEMMA_COMPILE": "sometimes"})
    base = parse_config(["--model", str(tiny_model_dir()), "--no-warmup", "--device", "cpu"], {})
    for compile_, runner_type in ((True, CompiledStepRunner), (None, StepRunner)):
        engine = load_engine(replace(base, compile=compile_), None)  # compiling waits for the first step
        try:
            assert type(engine.runner) is runner_type  # type: ignore[attr-defined]
            assert engine.runner.loaded.model.config._experts_implementation == "grouped_mm"  # type: ignore[attr-defined]
        finally:
            engine.shutdown()
