"""Command-line flags backed by environment variables (flags win), for every `dgemma` component."""

from __future__ import annotations

import argparse
from collections.abc import Mapping

TRUE_WORDS = ("1", "true", "yes", "on")


def fill_from_env(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    env_vars: Mapping[str, str],
    env: Mapping[str, str],
) -> None:
    """Set each option the command line left unset from its environment variable, converted and checked
    as the flag would be; a bad value is a usage error naming the variable."""
    actions = {a.dest: a for a in parser._actions}
    for dest, var in env_vars.items():
        raw = env.get(var, "")
        if getattr(args, dest, None) is not None or raw == "":
            continue
        action = actions[dest]
        if isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
            setattr(args, dest, raw.strip().lower() in TRUE_WORDS)
            continue
        convert = action.type if callable(action.type) else str
        try:
            value = convert(raw)
        except (ValueError, argparse.ArgumentTypeError) as exc:
            parser.error(f"{var}={raw!r}: {exc}")
        if action.choices is not None and value not in action.choices:
            parser.error(f"{var}={raw!r}: must be one of {list(action.choices)}")
        setattr(args, dest, value)
