"""`dgemma generate` and `dgemma make-tiny-model`: the worker's local commands (they load torch)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from dgemma_common.params import ParamError, params_from_mapping
from dgemma_common.types import ChatMessage, CommitEvent, DraftEvent, FinalEvent, ImageData, Prompt


def generate_parser() -> argparse.ArgumentParser:
    """Options of `dgemma generate`."""
    gen = argparse.ArgumentParser(prog="dgemma generate",
                                  description="Generate text locally (the bundled trained model by default).")
    gen.add_argument("prompt")
    gen.add_argument("--model", default=None, help="checkpoint directory or Hugging Face id")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--steps", type=int, default=None, help="max denoising steps per canvas")
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--stream", action="store_true", help="print each canvas as it is committed")
    gen.add_argument("--drafts", action="store_true", help="show denoising drafts on stderr")
    gen.add_argument("--raw", action="store_true", help="send the prompt as raw text, not as a chat turn")
    gen.add_argument("--image", action="append", default=[], type=Path, metavar="PATH",
                     help="an image (PNG, JPEG, WebP, GIF) placed before the prompt's text (repeatable)")
    gen.add_argument("--device", default=None)
    gen.add_argument("--dtype", default=None)
    gen.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                     help="the static-shape compiled decoder step (default: on with CUDA, off on a CPU)")
    return gen


def generate(argv: Sequence[str]) -> int:
    """`dgemma generate ...`: one request through the engine in this process."""
    from dgemma_worker.engine import Engine, EngineConfig
    from dgemma_worker.model import load_model, resolve_device
    from dgemma_worker.static import CompiledStepRunner, compiled_by_default

    args = generate_parser().parse_args(list(argv))
    knobs = {
        "max_new_tokens": args.max_new_tokens,
        "max_denoising_steps": args.steps,
        "seed": args.seed,
        "stop": args.stop or None,
        "stream_drafts": True if args.drafts else None,
    }
    try:
        params_from_mapping(knobs)  # refuse a bad value before loading anything
        images = [ImageData(path.read_bytes()) for path in args.image]
    except (ParamError, OSError) as err:
        print(f"dgemma generate: {err}", file=sys.stderr)
        return 2
    device = resolve_device(args.device)
    compiled = compiled_by_default(args.compile, device)
    loaded = load_model(args.model, device=str(device), dtype=args.dtype)
    runner = CompiledStepRunner(loaded, spare_slots=1) if compiled else None
    engine = Engine(loaded, EngineConfig(max_active=1, max_queue=0), runner=runner)
    params = params_from_mapping(knobs, engine.defaults)  # unset knobs: the checkpoint's own settings
    engine.start(warmup=False)
    if args.raw:
        prompt = Prompt.of_text(args.prompt, images)
    else:
        prompt = Prompt.of_messages([ChatMessage("user", (*images, args.prompt) if images else args.prompt)])
    final: FinalEvent | None = None
    pieces: list[str] = []
    try:
        for event in engine.generate(prompt, params):
            if isinstance(event, CommitEvent):
                pieces.append(event.text)
                if args.stream:
                    print(event.text, end="", flush=True)
            elif isinstance(event, DraftEvent) and args.drafts:
                print(f"\r[draft {event.canvas_index}:{event.step}] {event.text[:60]!r}", file=sys.stderr, end="")
            elif isinstance(event, FinalEvent):
                final = event
    except ParamError as err:  # a refused prompt, e.g. an image that is not one
        print(f"dgemma generate: {err}", file=sys.stderr)
        return 2
    finally:
        engine.shutdown()
    assert final is not None
    if not args.stream:
        print("".join(pieces), end="")
    print()
    s = final.stats
    print(
        f"[{final.stop_reason.value}] {s.prompt_tokens} prompt tokens, {s.completion_tokens} tokens, "
        f"{s.canvases} canvases, "
        f"{s.decoder_passes} decoder passes ({s.tokens_per_forward:.2f} tokens/forward), {s.total_s:.2f} s",
        file=sys.stderr,
    )
    return 0 if final.error is None else 1


def make_tiny_model(argv: Sequence[str]) -> int:
    """`dgemma make-tiny-model DIR [--seed N]`: write a tiny random-weight checkpoint."""
    from dgemma_worker.model import make_tiny_model as make

    parser = argparse.ArgumentParser(prog="dgemma make-tiny-model",
                                     description="Write a tiny random-weight DiffusionGemma checkpoint.")
    parser.add_argument("dir")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(list(argv))
    print(make(Path(args.dir), seed=args.seed))
    return 0
