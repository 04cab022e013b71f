"""The `dgemma` command: one entry point, a subcommand per component."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from .types import ChatMessage

# Subcommands implemented by other components: name -> (module, function taking argv, help).
DELEGATED: dict[str, tuple[str, str, str]] = {
    "worker": ("dgemma_worker.server", "run", "run the gRPC denoising worker"),
    "gateway": ("dgemma_gateway.main", "run", "run the OpenAI / KServe gateway"),
    "serve": ("dgemma_gateway.serve", "run", "run a local gateway and workers"),
    "operator": ("dgemma_operator.main", "run", "run the Kubernetes operator"),
    "bench": ("dgemma_worker.benchcli", "run", "run a benchmark"),
}


def _generate(args: argparse.Namespace) -> int:
    from .engine import Engine, EngineConfig
    from .model import load_model
    from .params import ParamError, params_from_mapping
    from .types import CommitEvent, DraftEvent, FinalEvent, Prompt

    knobs = {
        "max_new_tokens": args.max_new_tokens,
        "max_denoising_steps": args.steps,
        "seed": args.seed,
        "stop": args.stop or None,
        "stream_drafts": True if args.drafts else None,
    }
    try:
        params = params_from_mapping(knobs)
    except ParamError as err:
        print(f"dgemma generate: {err}", file=sys.stderr)
        return 2
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    engine = Engine(loaded, EngineConfig(max_active=1, max_queue=0))
    engine.start(warmup=False)
    prompt = Prompt.of_text(args.prompt) if args.raw else Prompt.of_messages(_chat(args.prompt))
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
    finally:
        engine.shutdown()
    assert final is not None
    if not args.stream:
        print("".join(pieces), end="")
    print()
    s = final.stats
    print(
        f"[{final.stop_reason.value}] {s.completion_tokens} tokens, {s.canvases} canvases, "
        f"{s.decoder_passes} decoder passes ({s.tokens_per_forward:.2f} tokens/forward), {s.total_s:.2f} s",
        file=sys.stderr,
    )
    return 0 if final.error is None else 1


def _chat(text: str) -> list[ChatMessage]:
    return [ChatMessage(role="user", content=text)]


def _make_tiny(args: argparse.Namespace) -> int:
    from .model import make_tiny_model

    out = make_tiny_model(Path(args.dir), seed=args.seed)
    print(out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dgemma", description="DiffusionGemma serving: worker, gateway, operator.")
    parser.add_argument("--log-level", default=os.environ.get("DGEMMA_LOG_LEVEL", "WARNING"))
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text locally (the bundled tiny model by default)")
    gen.add_argument("prompt")
    gen.add_argument("--model", default=None, help="checkpoint directory or Hugging Face id")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--steps", type=int, default=None, help="max denoising steps per canvas")
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--stream", action="store_true", help="print each canvas as it is committed")
    gen.add_argument("--drafts", action="store_true", help="show denoising drafts on stderr")
    gen.add_argument("--raw", action="store_true", help="send the prompt as raw text, not as a chat turn")
    gen.add_argument("--device", default=None)
    gen.add_argument("--dtype", default=None)
    gen.set_defaults(func=_generate)

    tiny = sub.add_parser("make-tiny-model", help="write a tiny random-weight DiffusionGemma checkpoint")
    tiny.add_argument("dir")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(func=_make_tiny)

    for name, (_, _, help_text) in DELEGATED.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def _delegate(name: str) -> Callable[[list[str]], int]:
    module, func, _ = DELEGATED[name]
    try:
        handler: Callable[[list[str]], int] = getattr(importlib.import_module(module), func)
        return handler
    except (ImportError, AttributeError):
        def missing(argv: list[str]) -> int:
            print(f"dgemma {name}: not available in this build", file=sys.stderr)
            return 2

        return missing


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `dgemma` console script."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # Delegated subcommands parse their own options.
    first = next((i for i, a in enumerate(args_list) if not a.startswith("-")), None)
    if first is not None and args_list[first] in DELEGATED:
        _setup_logging(_log_level(args_list[:first]))
        return _delegate(args_list[first])(args_list[first + 1 :])
    args = parser.parse_args(args_list)
    _setup_logging(args.log_level)
    return int(args.func(args))


def _log_level(global_args: list[str]) -> str:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--log-level", default=os.environ.get("DGEMMA_LOG_LEVEL", "WARNING"))
    return str(parser.parse_known_args(global_args)[0].log_level)


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # transformers' progress bars and advisory warnings are noise on a command line.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


if __name__ == "__main__":
    raise SystemExit(main())
