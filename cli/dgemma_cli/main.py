"""The `dgemma` command: one entry point, each subcommand a function of another package.

This module imports nothing but the standard library, so `dgemma --help` works in every install. A
subcommand whose package needs an extra that is not installed says which one in one line and exits 2;
any other ImportError is a bug and surfaces as one.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Subcommand:
    """Where a subcommand lives, what it needs, and its one-line help."""

    module: str
    function: str
    help: str
    needs: tuple[str, ...] = ()  # top-level modules of the extra it needs
    extra: str = ""


WORKER_EXTRA = ("torch", "transformers")

SUBCOMMANDS: dict[str, Subcommand] = {
    "serve": Subcommand("dgemma_serve.serve", "run", "run a local gateway and workers", WORKER_EXTRA, "worker"),
    "worker": Subcommand("dgemma_worker.server", "run", "run the gRPC denoising worker", WORKER_EXTRA, "worker"),
    "gateway": Subcommand("dgemma_gateway.main", "run", "run the OpenAI / KServe gateway"),
    "operator": Subcommand("dgemma_operator.main", "run", "run the Kubernetes operator and its autoscaler"),
    "generate": Subcommand("dgemma_worker.commands", "generate", "generate text locally", WORKER_EXTRA, "worker"),
    "make-tiny-model": Subcommand("dgemma_worker.commands", "make_tiny_model",
                                  "write a tiny random-weight DiffusionGemma checkpoint", WORKER_EXTRA, "worker"),
}


def missing_extra(command: Subcommand) -> str | None:
    """The first module of the command's extra that is not installed, or None."""
    return next((m for m in command.needs if importlib.util.find_spec(m) is None), None)


def build_parser() -> argparse.ArgumentParser:
    """Top-level options and the list of subcommands (each parses its own options)."""
    parser = argparse.ArgumentParser(prog="dgemma", description="DiffusionGemma serving: worker, gateway, operator.")
    parser.add_argument("--log-level", default=os.environ.get("DGEMMA_LOG_LEVEL", "WARNING"))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in SUBCOMMANDS.items():
        sub.add_parser(name, help=command.help, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `dgemma` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    first = next((i for i, a in enumerate(args) if not a.startswith("-")), None)
    if first is None or args[first] not in SUBCOMMANDS:
        build_parser().parse_args(args)  # prints usage (or --help) and exits
        return 2
    name = args[first]
    _setup_logging(_log_level(args[:first]))
    command = SUBCOMMANDS[name]
    absent = missing_extra(command)
    if absent is not None:
        print(f"dgemma {name}: needs the '{command.extra}' extra ({absent} is not installed): "
              f"pip install 'dgemma[{command.extra}]'", file=sys.stderr)
        return 2
    handler: Callable[[list[str]], int] = getattr(importlib.import_module(command.module), command.function)
    return int(handler(args[first + 1 :]))


def _log_level(global_args: list[str]) -> str:
    parser = argparse.ArgumentParser(prog="dgemma", add_help=False)
    parser.add_argument("--log-level", default=os.environ.get("DGEMMA_LOG_LEVEL", "WARNING"))
    return str(parser.parse_known_args(global_args)[0].log_level)


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # transformers' progress bars and advisory warnings are noise on a command line.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


if __name__ == "__main__":
    raise SystemExit(main())
