"""The engine end to end on the tiny checkpoint: events, seeds, limits, cancellation, admission."""

from __future__ import annotations

import asyncio
import hashlib
import re
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, DiffusionGemmaForBlockDiffusion

from dgemma_common.params import GenerationParams, Limits, ParamError
from dgemma_common.types import (
    ChatMessage,
    CommitEvent,
    DraftEvent,
    Event,
    FinalEvent,
    NotReadyError,
    OverloadedError,
    Prompt,
    PromptTooLongError,
    StopReason,
)
from dgemma_worker.commits import cut_canvas
from dgemma_worker.engine import Engine, EngineConfig
from dgemma_worker.model import EOS_ID, LoadedModel, load_model, make_tiny_model

HELLO = Prompt.of_messages([ChatMessage("user", "Hello there")])
LONG = GenerationParams(max_new_tokens=16 * 40, max_denoising_steps=64, seed=1, ignore_eos=True)


def run(engine: Engine, params: GenerationParams, prompt: Prompt = HELLO, **kw: object) -> list[Event]:
    return list(engine.generate(prompt, params, **kw))  # type: ignore[arg-type]


def final_of(events: list[Event]) -> FinalEvent:
    assert isinstance(events[-1], FinalEvent)
    assert sum(isinstance(e, FinalEvent) for e in events) == 1
    return events[-1]


def commits(events: list[Event]) -> list[CommitEvent]:
    return [e for e in events if isinstance(e, CommitEvent)]


def text_of(events: list[Event]) -> str:
    return "".join(c.text for c in commits(events))


def tokens_of(events: list[Event]) -> list[int]:
    return [t for c in commits(events) for t in c.token_ids]


# ---- the tiny checkpoint ------------------------------------------------------------------------


def digest(path: Path) -> str:
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


def test_the_tiny_checkpoint_is_deterministic_small_and_loads_like_a_real_one(tmp_path: Path, tiny_dir: Path) -> None:
    again = make_tiny_model(tmp_path / "again", seed=0)
    other = make_tiny_model(tmp_path / "other", seed=1)
    assert digest(again) == digest(tiny_dir)
    assert digest(other) != digest(tiny_dir)
    assert (again / "tokenizer.json").read_bytes() == (tiny_dir / "tokenizer.json").read_bytes()
    size = sum(f.stat().st_size for f in tiny_dir.iterdir())
    assert size < 5_000_000
    model = DiffusionGemmaForBlockDiffusion.from_pretrained(tiny_dir)
    assert sum(p.numel() for p in model.parameters()) < 1_000_000  # the vision tower is tiny too
    assert model.generation_config.pad_token_id == 0
    assert EOS_ID in model.generation_config.eos_token_id
    assert model.generation_config.bos_token_id == 2
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=True)
    text = tok.decode(ids if isinstance(ids, list) else ids["input_ids"])
    assert text == "<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n"
    assert tok.decode(tok("Diffusion models, 2024!")["input_ids"], skip_special_tokens=True) == (
        "Diffusion models, 2024!"
    )


def test_stock_generate_stops_at_eos_on_the_tiny_checkpoint(loaded: LoadedModel) -> None:
    """The saved generation config is what makes stock generate() stop and pad."""
    torch.manual_seed(0)
    out = loaded.model.generate(torch.tensor([[2, 50, 60]]), max_new_tokens=64, max_denoising_steps=2)
    assert out.sequences.shape[1] - 3 in (16, 32, 48, 64)


# ---- events, lengths, stops ---------------------------------------------------------------------


def test_a_request_streams_one_commit_per_canvas_then_a_final_with_stats(engine: Engine) -> None:
    events = run(engine, GenerationParams(max_new_tokens=40, max_denoising_steps=4, seed=3, ignore_eos=True))
    final = final_of(events)
    assert final.stop_reason is StopReason.LENGTH
    assert [c.canvas_index for c in commits(events)] == [0, 1, 2]
    stats = final.stats
    assert stats.completion_tokens == 40 == len(tokens_of(events))
    assert stats.canvases == 3 and stats.encoder_passes == 3
    assert stats.decoder_passes == 12  # random weights: every canvas runs all its steps
    assert stats.tokens_per_forward == pytest.approx(40 / 12)
    assert stats.prompt_tokens > 0 and stats.queue_wait_s >= 0
    assert stats.time_to_first_commit_s is not None and 0 < stats.time_to_first_commit_s <= stats.total_s


@pytest.mark.parametrize("budget", [1, 15, 16, 17, 33])
def test_output_is_truncated_to_exactly_max_new_tokens(engine: Engine, budget: int) -> None:
    events = run(engine, GenerationParams(max_new_tokens=budget, max_denoising_steps=2, seed=4, ignore_eos=True))
    assert len(tokens_of(events)) == budget
    assert final_of(events).stop_reason is StopReason.LENGTH
    assert final_of(events).stats.canvases == -(-budget // 16)


def test_committed_text_is_the_detokenized_tokens(engine: Engine) -> None:
    events = run(engine, GenerationParams(max_new_tokens=64, max_denoising_steps=3, seed=5, ignore_eos=True))
    assert text_of(events) == engine.detokenize(tokens_of(events))


def test_generation_stops_at_eos_and_drops_it(engine: Engine) -> None:
    for seed in range(40):
        events = run(engine, GenerationParams(max_new_tokens=160, max_denoising_steps=2, seed=seed))
        if final_of(events).stop_reason is StopReason.EOS:
            break
    else:
        pytest.fail("no seed produced EOS")
    assert not set(tokens_of(events)) & set(engine.loaded.eos_token_ids)
    same_seed_ignoring_eos = run(engine, GenerationParams(max_new_tokens=160, max_denoising_steps=2, seed=seed,
                                                          ignore_eos=True))
    longer = tokens_of(same_seed_ignoring_eos)
    assert longer[: len(tokens_of(events))] == tokens_of(events)
    assert longer[len(tokens_of(events))] in engine.loaded.eos_token_ids


def test_cut_canvas_keeps_tokens_before_eos_within_the_budget() -> None:
    assert cut_canvas([5, 6, 1, 7], room=10, eos_ids=[1]) == ([5, 6], StopReason.EOS)
    assert cut_canvas([5, 6, 1, 7], room=2, eos_ids=[1]) == ([5, 6], StopReason.LENGTH)
    assert cut_canvas([5, 6, 7, 8], room=10, eos_ids=[1]) == ([5, 6, 7, 8], None)
    assert cut_canvas([5, 6, 7, 8], room=4, eos_ids=[]) == ([5, 6, 7, 8], StopReason.LENGTH)


def test_a_stop_string_spanning_two_canvases_ends_the_text_before_it(engine: Engine) -> None:
    params = GenerationParams(max_new_tokens=96, max_denoising_steps=3, seed=11, ignore_eos=True)
    full = run(engine, params)
    pieces = [c.text for c in commits(full)]
    assert len(pieces[0]) >= 2 and len(pieces[1]) >= 2
    boundary = len(pieces[0])
    whole = "".join(pieces)
    stop = whole[boundary - 2 : boundary + 2]
    expected = whole[: whole.find(stop)]
    events = run(engine, replace(params, stop=(stop, "never-seen-stop")))
    assert final_of(events).stop_reason is StopReason.STOP_STRING
    assert text_of(events) == expected
    assert stop not in text_of(events)


def test_drafts_stream_before_each_commit_and_are_rate_limited(engine: Engine) -> None:
    params = GenerationParams(max_new_tokens=32, max_denoising_steps=6, seed=2, stream_drafts=True, ignore_eos=True)
    events = run(engine, params)
    drafts = [e for e in events if isinstance(e, DraftEvent)]
    assert len(drafts) == 2 * 5  # every step but the committing one
    assert [d.step for d in drafts[:5]] == [1, 2, 3, 4, 5]
    assert all(len(d.token_ids) == 16 for d in drafts)
    limited = run(engine, replace(params, draft_interval_s=30.0))
    assert len([e for e in limited if isinstance(e, DraftEvent)]) == 1
    assert not any(isinstance(e, DraftEvent) for e in run(engine, replace(params, stream_drafts=False)))


def test_chat_text_and_token_prompts_are_accepted(engine: Engine) -> None:
    params = GenerationParams(max_new_tokens=8, max_denoising_steps=2, seed=1, ignore_eos=True)
    ids = engine.tokenize(HELLO)
    assert engine.detokenize(ids).startswith("user\nHello there")
    a = run(engine, params, HELLO)
    b = run(engine, params, Prompt.of_tokens(ids))
    assert tokens_of(a) == tokens_of(b)
    assert len(tokens_of(run(engine, params, Prompt.of_text("plain text")))) == 8


# ---- seeds --------------------------------------------------------------------------------------


def test_same_seed_same_output_and_different_seed_different_output(engine: Engine) -> None:
    params = GenerationParams(max_new_tokens=32, max_denoising_steps=3, seed=42, ignore_eos=True)
    first, second = run(engine, params), run(engine, params)
    assert tokens_of(first) == tokens_of(second)
    assert tokens_of(run(engine, replace(params, seed=43))) != tokens_of(first)


def test_a_request_output_does_not_depend_on_what_else_is_running(engine: Engine) -> None:
    params = GenerationParams(max_new_tokens=48, max_denoising_steps=4, seed=7, ignore_eos=True)
    alone = tokens_of(run(engine, params))
    results: dict[int, list[int]] = {}

    def one(i: int, p: GenerationParams) -> None:
        results[i] = tokens_of(run(engine, p))

    threads = [threading.Thread(target=one, args=(i, replace(params, seed=100 + i))) for i in range(3)]
    threads.append(threading.Thread(target=one, args=(99, params)))
    torch.manual_seed(123)  # the global RNG is not what drives requests
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results[99] == alone


# ---- cancellation, deadlines, admission ---------------------------------------------------------


def test_cancel_stops_a_request_within_one_step_and_spares_the_others(engine: Engine) -> None:
    bystander_params = GenerationParams(max_new_tokens=48, max_denoising_steps=4, seed=9, ignore_eos=True)
    expected = tokens_of(run(engine, bystander_params))
    victim_events: list[Event] = []
    seen_draft = threading.Event()

    def sink(event: Event) -> None:
        victim_events.append(event)
        if isinstance(event, DraftEvent):
            seen_draft.set()

    handle = engine.submit(HELLO, replace(LONG, stream_drafts=True), sink)
    bystander = engine.generate(HELLO, bystander_params)
    assert seen_draft.wait(10)
    passes_at_cancel = sum(isinstance(e, DraftEvent) for e in victim_events)
    handle.cancel()
    assert tokens_of(list(bystander)) == expected
    deadline = time.monotonic() + 10
    while not victim_events or not isinstance(victim_events[-1], FinalEvent):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    final = final_of(victim_events)
    assert final.stop_reason is StopReason.CANCELLED
    assert final.stats.decoder_passes <= passes_at_cancel + 3
    assert engine.load_snapshot().active == 0


def test_closing_the_event_iterator_cancels_the_request(engine: Engine) -> None:
    stream = engine.generate(HELLO, LONG)
    first = next(stream)
    assert isinstance(first, CommitEvent)
    stream.close()
    assert engine.wait_idle(10)
    assert engine.counters.requests_by_outcome.get("cancelled") == 1


async def test_cancelling_an_async_stream_cancels_the_request(engine: Engine) -> None:
    async def consume() -> None:
        async for _ in engine.stream(HELLO, LONG):
            pass

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await asyncio.to_thread(engine.wait_idle, 10)
    assert engine.counters.requests_by_outcome.get("cancelled") == 1


async def test_an_async_stream_yields_the_same_events_as_the_sync_one(engine: Engine) -> None:
    params = GenerationParams(max_new_tokens=20, max_denoising_steps=2, seed=8, ignore_eos=True)
    events = [e async for e in engine.stream(HELLO, params)]
    assert tokens_of(events) == tokens_of(await asyncio.to_thread(run, engine, params))


def test_a_passed_deadline_ends_the_request(engine: Engine) -> None:
    events = run(engine, LONG, deadline=time.monotonic() + 0.2)
    final = final_of(events)
    assert final.stop_reason is StopReason.DEADLINE
    assert 0.15 <= final.stats.total_s < 5


def test_admission_is_bounded_and_overload_is_a_clear_error(loaded: LoadedModel) -> None:
    engine = Engine(loaded, EngineConfig(max_active=1, max_queue=1))
    engine.start(warmup=False)
    try:
        finals: list[FinalEvent] = []
        sink = lambda e: finals.append(e) if isinstance(e, FinalEvent) else None  # noqa: E731
        engine.submit(HELLO, LONG, sink)
        engine.submit(HELLO, LONG, sink)
        with pytest.raises(OverloadedError, match="max_active=1, max_queue=1"):
            engine.submit(HELLO, LONG, sink)
        deadline = time.monotonic() + 5
        while engine.load_snapshot().active == 0 and time.monotonic() < deadline:
            time.sleep(0.01)  # the step thread takes the first request into its slot
        snap = engine.load_snapshot()
        assert (snap.active, snap.queue_depth, snap.capacity) == (1, 1, 1)
    finally:
        engine.shutdown()
    assert [f.stop_reason for f in finals] == [StopReason.CANCELLED, StopReason.CANCELLED]


def test_queued_requests_wait_for_a_slot_and_report_their_wait(loaded: LoadedModel) -> None:
    engine = Engine(loaded, EngineConfig(max_active=1, max_queue=4))
    engine.start(warmup=False)
    try:
        params = GenerationParams(max_new_tokens=64, max_denoising_steps=8, seed=1, ignore_eos=True)
        results: list[FinalEvent] = []
        threads = [threading.Thread(target=lambda: results.append(final_of(run(engine, params)))) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        waits = sorted(f.stats.queue_wait_s for f in results)
        assert [f.stop_reason for f in results] == [StopReason.LENGTH] * 3
        assert waits[-1] > waits[0]
    finally:
        engine.shutdown()


def test_requests_are_interleaved_so_a_short_one_is_not_stuck_behind_a_long_one(engine: Engine) -> None:
    order: list[str] = []
    long_done = threading.Event()

    def sink(event: Event) -> None:
        if isinstance(event, FinalEvent):
            order.append("long")
            long_done.set()

    engine.submit(HELLO, replace(LONG, max_new_tokens=16 * 10), sink)
    short = final_of(run(engine, GenerationParams(max_new_tokens=16, max_denoising_steps=4, seed=1, ignore_eos=True)))
    order.append("short")
    assert long_done.wait(30)
    assert order == ["short", "long"]
    assert short.stop_reason is StopReason.LENGTH


def test_draining_refuses_new_requests_and_finishes_in_flight_ones(engine: Engine) -> None:
    params = GenerationParams(max_new_tokens=64, max_denoising_steps=8, seed=1, ignore_eos=True)
    in_flight = engine.generate(HELLO, params)
    first = next(in_flight)
    engine.drain()
    assert not engine.ready and engine.load_snapshot().draining
    with pytest.raises(NotReadyError, match="draining"):
        engine.submit(HELLO, params, lambda e: None)
    rest = [first, *in_flight]
    assert final_of(rest).stop_reason is StopReason.LENGTH
    assert engine.wait_idle(5)


def test_an_engine_that_is_not_started_is_not_ready(loaded: LoadedModel) -> None:
    engine = Engine(loaded)
    with pytest.raises(NotReadyError, match="loading"):
        engine.submit(HELLO, GenerationParams(), lambda e: None)


def test_bad_requests_are_refused_before_they_reach_the_model(loaded: LoadedModel) -> None:
    limits = Limits(max_prompt_tokens=8, max_new_tokens=64)
    engine = Engine(loaded, EngineConfig(limits=limits, defaults=GenerationParams(max_new_tokens=8)))
    engine.start(warmup=False)
    try:
        sink = lambda e: None  # noqa: E731
        with pytest.raises(PromptTooLongError, match="exceeds the limit of 8"):
            engine.submit(Prompt.of_tokens([5] * 9), GenerationParams(max_new_tokens=8), sink)
        with pytest.raises(ParamError) as err:
            engine.submit(Prompt.of_tokens([5, 99999]), GenerationParams(max_new_tokens=8), sink)
        assert err.value.field == "prompt.token_ids"
        with pytest.raises(ParamError) as err:
            engine.submit(HELLO, GenerationParams(max_new_tokens=65), sink)
        assert err.value.field == "max_new_tokens"
        with pytest.raises(ParamError) as err:
            engine.submit(Prompt(), GenerationParams(max_new_tokens=8), sink)
        assert err.value.field == "prompt"
        with pytest.raises(ParamError) as err:
            engine.submit(Prompt.of_text(""), GenerationParams(max_new_tokens=8), sink)
        assert err.value.field == "prompt"
        assert engine.counters.decoder_passes == 0 and engine.load_snapshot().queue_depth == 0
    finally:
        engine.shutdown()


def test_a_request_beyond_the_context_window_names_max_new_tokens(loaded: LoadedModel) -> None:
    engine = Engine(loaded, EngineConfig(limits=Limits(max_new_tokens=100_000)))
    engine.start(warmup=False)
    try:
        with pytest.raises(ParamError, match="context is 8192") as err:
            engine.submit(HELLO, GenerationParams(max_new_tokens=9000), lambda e: None)
        assert err.value.field == "max_new_tokens"
    finally:
        engine.shutdown()


def test_out_of_memory_fails_only_that_request_and_the_engine_stays_up(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = engine.loaded.model
    real_forward = model.forward
    calls = {"n": 0}

    def flaky_forward(*args: object, **kwargs: object) -> object:
        calls["n"] += 1
        if calls["n"] == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", flaky_forward)
    params = GenerationParams(max_new_tokens=16, max_denoising_steps=2, seed=1, ignore_eos=True)
    failed = final_of(run(engine, params))
    assert (failed.stop_reason, failed.error_kind) == (StopReason.ERROR, "oom")
    assert final_of(run(engine, params)).stop_reason is StopReason.LENGTH
    assert engine.ready


def test_load_snapshot_reports_speed_after_work(engine: Engine) -> None:
    run(engine, GenerationParams(max_new_tokens=48, max_denoising_steps=4, seed=1, ignore_eos=True))
    snap = engine.load_snapshot()
    assert snap.ready and not snap.draining
    assert snap.step_latency_s > 0 and snap.encoder_latency_s > 0 and snap.tokens_per_s > 0
    assert snap.canvas_length == 16 and snap.tokens_total == 48 and snap.steps_total == 12
    assert engine.counters.decoder_forward_s <= engine.counters.decoder_step_s


def test_a_model_loads_from_a_directory_with_explicit_device_and_dtype(tiny_dir: Path) -> None:
    loaded = load_model(tiny_dir, device="cpu", dtype="float32", name="served-name")
    assert loaded.name == "served-name" and loaded.device.type == "cpu" and loaded.dtype == torch.float32
    with pytest.raises(ValueError, match="dtype"):
        load_model(tiny_dir, device="cpu", dtype="float8")


def test_a_dead_step_thread_fails_pending_requests_and_reports_not_alive(
    loaded: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = Engine(loaded)
    engine.start(warmup=False)
    try:
        assert engine.alive
        monkeypatch.setattr(engine, "_turn", lambda group: (_ for _ in ()).throw(RuntimeError("scheduler bug")))
        final = final_of(run(engine, GenerationParams(max_new_tokens=16, max_denoising_steps=2, seed=1)))
        assert (final.stop_reason, final.error_kind) == (StopReason.ERROR, "internal")
        assert not engine.alive and not engine.ready
        with pytest.raises(NotReadyError, match="engine failed"):
            engine.submit(HELLO, GenerationParams(), lambda e: None)
    finally:
        engine.shutdown()


def test_each_profiles_dtype_resolves_its_dependencies_and_quantizes_linears_and_experts() -> None:
    """Import-level on a CPU: the fp8 path (torchao Float8, h100) builds its config from installed packages."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, FqnToConfig, PerRow
    from transformers import TorchAoConfig

    from dgemma_worker.model import EXPERT_WEIGHTS, quantization_for, resolve_dtype, torchao_config

    cuda, hopper, blackwell = torch.device("cuda"), (9, 0), (10, 0)
    assert resolve_dtype("fp8", cuda) == torch.bfloat16 and resolve_dtype("nvfp4", cuda) == torch.bfloat16
    fp8 = quantization_for("fp8", hopper, checkpoint_quantized=False)
    assert isinstance(fp8, TorchAoConfig) and isinstance(fp8.quant_type, FqnToConfig)
    weights = fp8.quant_type.fqn_to_config[EXPERT_WEIGHTS]
    assert isinstance(weights, Float8DynamicActivationFloat8WeightConfig) and isinstance(weights.granularity[0],
                                                                                          PerRow)
    assert "router" in fp8.modules_to_not_convert
    assert quantization_for("fp8", hopper, checkpoint_quantized=True) is None  # a pre-quantized checkpoint
    assert quantization_for("bf16", None, checkpoint_quantized=False) is None
    # nvfp4 (dgx-spark): torchao's NVFP4 config imports; the experts' kernels (MSLK) come with the image.
    from torchao.prototype.mx_formats import NVFP4DynamicActivationNVFP4WeightConfig  # noqa: F401

    with pytest.raises(ValueError, match="nvfp4 needs the MSLK kernels"):
        torchao_config("nvfp4")
    with pytest.raises(ValueError, match="nvfp4 needs the MSLK kernels"):
        quantization_for("nvfp4", blackwell, checkpoint_quantized=False)


@pytest.mark.parametrize(
    ("dtype", "capability", "message"),
    [
        ("fp8", None, "dtype: dtype fp8 needs an NVIDIA GPU of compute capability 8.9 or newer; this worker's "
                      "device has no CUDA GPU"),
        ("fp8", (8, 0), "compute capability 8.9 or newer; this worker's device has 8.0"),
        ("nvfp4", (9, 0), "dtype nvfp4 needs an NVIDIA GPU of compute capability 10.0 or newer; this worker's "
                          "device has 9.0"),
    ],
)
def test_a_dtype_the_device_cannot_run_is_a_clear_error(
    dtype: str, capability: tuple[int, int] | None, message: str
) -> None:
    from dgemma_worker.model import quantization_for

    with pytest.raises(ValueError, match=re.escape(message)):
        quantization_for(dtype, capability, checkpoint_quantized=False)


def test_loading_nvfp4_weights_on_a_cpu_fails_with_a_clear_error(tiny_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"dtype: dtype nvfp4 needs an NVIDIA GPU .* this worker's device has no CUDA"):
        load_model(tiny_dir, device="cpu", dtype="nvfp4")


def test_experts_load_as_grouped_mm_on_a_cpu_too_and_weights_load_straight_to_it(tiny_dir: Path) -> None:
    """transformers' own default, which stock generate() gets: a CPU is no exception (docs/engine.md)."""
    loaded = load_model(tiny_dir, device="cpu")
    assert loaded.model.config.text_config._experts_implementation == "grouped_mm"
    assert {p.device.type for p in loaded.model.parameters()} == {"cpu"}
