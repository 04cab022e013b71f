"""The denoising step on a GPU: transformers' own generate() vs the engine's sync-free step, eager and
compiled (static shapes; CUDA graphs on CUDA), side by side.

    python bench/bench_gpu.py                # a GPU: the real layout scaled to ~3.3B parameters, bf16 (+ fp8)
    python bench/bench_gpu.py --smoke        # a CPU: the same table on a small model (~3 min: two compiles)

The model is made on the spot with random weights in the real checkpoint's layout (30 layers, 5 sliding :
1 full attention, 128 experts top-8, canvas 256, vocabulary 262144; widths scaled down), so every canvas
runs exactly `--steps` steps. Per path and batch size: decoder forward ms, sampling ms (the rest of the
step), host ms per step (time the CPU spends issuing a step), host syncs per step (counted by
dgemma_worker.syncs.SyncCounter), and tokens/s. The compiled step's compile time (its first canvas) is
printed apart. Sized for a 10-minute GPU slot.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from dgemma_common.params import GenerationParams
from dgemma_common.types import FinalEvent, Prompt
from dgemma_worker.engine import Engine, EngineConfig
from dgemma_worker.model import LoadedModel, TinyModelSpec, load_model, make_tiny_model
from dgemma_worker.runner import Batch, RowSpec, StepRunner
from dgemma_worker.static import CompiledStepRunner
from dgemma_worker.syncs import SyncCounter

GPU_SPEC = TinyModelSpec(
    hidden_size=1024, num_hidden_layers=30, num_attention_heads=8, num_key_value_heads=4, head_dim=128,
    intermediate_size=2048, num_experts=128, top_k_experts=8, moe_intermediate_size=256, canvas_length=256,
    model_vocab_size=262144, sliding_window=1024, full_attention_every=6,
)
SMOKE_SPEC = TinyModelSpec(
    hidden_size=64, num_hidden_layers=6, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
    intermediate_size=128, num_experts=16, top_k_experts=4, moe_intermediate_size=32, canvas_length=64,
    model_vocab_size=8192, sliding_window=128, full_attention_every=6,
)
PROMPT = [2, *range(40, 103)]  # 64 tokens


@dataclass
class Row:
    path: str
    batch: int
    forward_ms: float
    sampling_ms: float
    host_ms: float
    syncs_per_step: float
    tokens_per_s: float


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ForwardTimer:
    """Adds up the (device-synchronized) time of the model's forward calls."""

    def __init__(self, model: Any, device: torch.device) -> None:
        self.model, self.device, self.seconds, self.calls = model, device, 0.0, 0
        self._orig = model.forward

    def __enter__(self) -> ForwardTimer:
        def timed(*args: Any, **kwargs: Any) -> Any:
            sync(self.device)
            start = time.perf_counter()
            out = self._orig(*args, **kwargs)
            sync(self.device)
            self.seconds += time.perf_counter() - start
            self.calls += 1
            return out

        self.model.forward = timed
        return self

    def __exit__(self, *exc: object) -> None:
        del self.model.forward


def stock(loaded: LoadedModel, steps: int, batch: int) -> Row:
    """transformers' generate(): one canvas of `steps` steps for `batch` identical prompts."""
    model, device = loaded.model, loaded.device
    x = torch.tensor([PROMPT] * batch, device=device)
    kwargs = {"max_new_tokens": loaded.canvas_length, "max_denoising_steps": steps, "eos_token_id": None,
              "confidence_threshold": 1e-9}
    model.generate(x, **{**kwargs, "max_denoising_steps": 2})  # warm-up
    with SyncCounter() as counter:
        model.generate(x, **kwargs)
    with ForwardTimer(model, device) as forward:
        sync(device)
        start = time.perf_counter()
        model.generate(x, **kwargs)
        sync(device)
        elapsed = time.perf_counter() - start
    per_step = elapsed / steps
    fwd = forward.seconds / forward.calls
    return Row("transformers generate()", batch, fwd * 1e3, (per_step - fwd) * 1e3, float("nan"),
               counter.total / steps, batch * loaded.canvas_length / elapsed)


def pause_during_forward(runner: StepRunner, counter: SyncCounter) -> None:
    """Count no syncs inside the compiled forward: dynamo will not run its graph under the counter's
    dispatch mode, and the graph cannot hold a sync anyway (SyncCounter.paused). Undo: del the attribute."""
    run_forward = runner.decoder_forward

    def forward(batch: Batch) -> torch.Tensor:
        with counter.paused():
            return run_forward(batch)

    runner.decoder_forward = forward  # type: ignore[method-assign]


def engine_step(loaded: LoadedModel, steps: int, batch: int, compiled: bool = False) -> Row:
    """The engine's step runner, eager or compiled: one batch of `batch` rows, one canvas of `steps` steps."""
    device = loaded.device
    runner = CompiledStepRunner(loaded, max_batch=batch) if compiled else StepRunner(loaded, max_batch=batch)
    params = GenerationParams(max_denoising_steps=steps, confidence_threshold=1e-9)

    def canvas(measure: str) -> tuple[float, float, float, int]:
        rows = [RowSpec(PROMPT, params, torch.Generator(device=device).manual_seed(i)) for i in range(batch)]
        b = runner.new_batch(rows)
        forward = host = 0.0
        with torch.inference_mode():
            runner.encode(b)
            sync(device)
            counter = SyncCounter()
            if measure == "syncs" and compiled:
                pause_during_forward(runner, counter)
            start = time.perf_counter()
            for _ in range(steps):
                t0 = time.perf_counter()
                if measure == "syncs":
                    with counter:
                        runner.settle(b)
                        runner.denoise(b)
                    continue
                runner.settle(b)
                if measure == "forward":
                    sync(device)
                    f0 = time.perf_counter()
                    logits = runner.decoder_forward(b)
                    sync(device)
                    forward += time.perf_counter() - f0
                    del logits
                runner.denoise(b)
                host += time.perf_counter() - t0
            runner.settle(b)
            sync(device)
            if "decoder_forward" in vars(runner):
                del runner.decoder_forward
            return time.perf_counter() - start, forward, host, counter.total

    started = time.perf_counter()
    canvas("time")  # warm-up (and, compiled, the compilation of this batch size's graph)
    if compiled:
        print(f"compiled step, batch {batch}: first canvas (compiling) {time.perf_counter() - started:.1f} s")
    elapsed, _, host, _ = canvas("time")
    _, forward, _, _ = canvas("forward")
    _, _, _, syncs = canvas("syncs")
    per_step = elapsed / steps
    fwd = forward / steps
    name = f"engine step ({'compiled' if compiled else 'eager'})"
    return Row(name, batch, fwd * 1e3, (per_step - fwd) * 1e3, host / steps * 1e3, syncs / steps,
               batch * loaded.canvas_length / elapsed)


def engine_interleaved(loaded: LoadedModel, steps: int, active: int) -> Row:
    """The whole engine with `active` concurrent requests (no batching): aggregate tokens/s."""
    engine = Engine(loaded, EngineConfig(max_active=active, max_queue=active))
    engine.start(warmup=False)
    params = GenerationParams(max_new_tokens=loaded.canvas_length, max_denoising_steps=steps, ignore_eos=True,
                              confidence_threshold=1e-9, seed=0)
    try:
        start = time.perf_counter()
        streams = [engine.generate(Prompt.of_tokens(PROMPT), params) for _ in range(active)]
        finals = [next(e for e in s if isinstance(e, FinalEvent)) for s in streams]
        elapsed = time.perf_counter() - start
    finally:
        engine.shutdown()
    tokens = sum(f.stats.completion_tokens for f in finals)
    return Row(f"engine, {active} requests interleaved", active, float("nan"), float("nan"), float("nan"),
               float("nan"), tokens / elapsed)


def table(rows: list[Row]) -> str:
    head = "| path | batch | forward ms | sampling ms | host ms/step | host syncs/step | tokens/s |"
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        cells = [r.forward_ms, r.sampling_ms, r.host_ms, r.syncs_per_step, r.tokens_per_s]
        shown = ["-" if v != v else f"{v:.1f}" for v in cells]  # NaN: not measured on that path
        lines.append(f"| {r.path} | {r.batch} | " + " | ".join(shown) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true",
                        help="a small model on the CPU (~3 minutes, most of it compiling)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps per canvas (16; smoke 8)")
    parser.add_argument("--max-active", type=int, default=4, help="the profile's concurrent requests")
    parser.add_argument("--dtype", action="append", default=None, help="bf16 and/or fp8 (GPU: both)")
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    spec = SMOKE_SPEC if args.smoke else GPU_SPEC
    steps = args.steps or (8 if args.smoke else 16)
    dtypes = args.dtype or (["fp32"] if device == "cpu" else ["bf16", "fp8"])
    if device == "cpu":
        torch.set_num_threads(2)
    results: dict[str, list[Row]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny_model(Path(tmp) / "model", spec=spec)
        for dtype in dtypes:
            loaded = load_model(path, device=device, dtype=dtype, experts="grouped_mm")
            params = sum(p.numel() for p in loaded.model.parameters())
            print(f"\n{dtype} on {device}: {params / 1e9:.2f}B parameters, canvas {loaded.canvas_length}, "
                  f"vocabulary {loaded.vocab_size}, {steps} steps per canvas")
            with torch.inference_mode():
                rows = [stock(loaded, steps, 1), engine_step(loaded, steps, 1), engine_step(loaded, steps, 1, True),
                        stock(loaded, steps, args.max_active), engine_step(loaded, steps, args.max_active),
                        engine_step(loaded, steps, args.max_active, True)]
            rows.append(engine_interleaved(loaded, steps, args.max_active))
            print(table(rows))
            print(f"host syncs per step: {rows[1].syncs_per_step:g}")
            print(f"compiled host syncs per step: {rows[2].syncs_per_step:g}")
            print(f"stock host syncs per step: {rows[0].syncs_per_step:g}")
            results[dtype] = rows
            del loaded
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({k: [asdict(r) for r in v] for k, v in results.items()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
