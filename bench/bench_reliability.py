"""Reliability under hostile input, from one run: the fuzz and chaos suites (tests/fuzz, tests/chaos), run with
more cases than CI gives them, write what they saw (DGEMMA_RELIABILITY_OUT); this prints the "reliability"
table of docs/benchmarks.md from it.

What is measured: cases tried per surface and the answers they got (HTTP status or gRPC code); the worst
health-check round trip of the gateway and the worker while the fuzzers ran (an outside view of how long an
event loop stalled: a stalled loop answers nothing); the largest gap in a live stream while a 10 MB prompt
arrives beside it; the processes' peak resident memory under the hostile corpus; requests lost when a worker is
SIGKILLed and when workers, the gateway and `dgemma serve` are drained with SIGTERM.

Usage: python bench/bench_reliability.py [--examples 100] [--out bench/out/reliability]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from dgemma_serve.lifetime import die_with_parent

ROOT = Path(__file__).resolve().parents[1]
REFUSALS = ("400", "401", "404", "405", "413", "415", "422", "429", "INVALID_ARGUMENT", "UNAUTHENTICATED",
            "NOT_FOUND", "RESOURCE_EXHAUSTED", "UNIMPLEMENTED", "FAILED_PRECONDITION", "OUT_OF_RANGE")


def run_suites(out: Path, examples: int) -> float:
    """Run the suites once with their measurements on; seconds taken."""
    env = {**os.environ, "DGEMMA_FUZZ_EXAMPLES": str(examples), "DGEMMA_RELIABILITY_OUT": str(out)}
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/fuzz",
                             "tests/chaos"], cwd=ROOT, env=env, preexec_fn=die_with_parent())
    if result.returncode != 0:
        raise SystemExit(f"the suites failed (exit {result.returncode}): the table would not describe a green run")
    return time.monotonic() - started


def _load(out: Path, name: str) -> dict[str, Any]:
    path = out / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def table(out: Path) -> str:
    """The markdown tables."""
    fuzz = _load(out, "fuzz")
    lines = ["| surface | cases | answers |", "|---|---:|---|"]
    refusals: Counter[str] = Counter()
    total = 0
    for surface, outcomes in sorted(fuzz.get("outcomes", {}).items()):
        n = sum(outcomes.values())
        total += n
        refusals.update({k: v for k, v in outcomes.items() if k in REFUSALS})
        shown = ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items(), key=lambda kv: -kv[1]))
        lines.append(f"| {surface} | {n} | {shown} |")
    lines.append(f"| **all** | **{total}** | refusals: {', '.join(f'{k} {v}' for k, v in refusals.most_common())} |")
    probe = fuzz.get("worst_probe_ms", {})
    worker_stall = max((v for k, v in probe.items() if k.startswith("worker")), default=None)
    big = _load(out, "chaos-big-prompt")
    kill, stack, serve = _load(out, "chaos-kill"), _load(out, "chaos-drain-stack"), _load(out, "chaos-drain-serve")
    peak, base = fuzz.get("peak_rss_mib", {}), fuzz.get("baseline_rss_mib", {})

    big_probe = big.get("worst_probe_ms", {})
    big_answers = ", ".join(f"{k}: {v}" for k, v in sorted(big.get("refusals", {}).items()))

    def mib(name: str) -> str:
        return f"{peak[name]:.0f} MiB (after warm-up {base[name]:.0f})" if name in peak else "-"

    lines += [
        "",
        "| measure | value |",
        "|---|---|",
        f"| worst health round trip while fuzzed: gateway / worker | {probe.get('gateway', '-')} ms / "
        f"{worker_stall if worker_stall is not None else '-'} ms |",
        f"| health probes that failed while fuzzed | {len(fuzz.get('probe_failures', []))} |",
        f"| live stream beside a 10 MB prompt: largest gap / its step / largest gap outside the prompt's window | "
        f"{big.get('largest_gap_ms', '-')} ms / {big.get('step_ms', '-')} ms / "
        f"{big.get('largest_gap_outside_ms', '-')} ms "
        f"(worst health round trip: gateway {big_probe.get('gateway', '-')} ms, "
        f"worker {big.get('worst_worker_probe_ms', '-')} ms) |",
        f"| the 10 MB prompt's answers | {big_answers} |",
        f"| peak RSS under the hostile corpus: worker | {mib('worker')} |",
        f"| peak RSS under the hostile corpus: gateway | {mib('gateway')} |",
        f"| worker SIGKILLed mid-stream: requests / completed / clean error / lost | {kill.get('requests', '-')} / "
        f"{kill.get('completed', '-')} / {kill.get('clean_errors', '-')} / {kill.get('lost', '-')} |",
        f"| SIGTERM drain of a worker then the gateway: requests / lost | {stack.get('requests', '-')} / "
        f"{stack.get('lost', '-')} |",
        f"| SIGTERM drain of `dgemma serve` (streams longer than 5 s): requests / lost | "
        f"{serve.get('requests', '-')} / {serve.get('lost', '-')} |",
    ]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--examples", type=int, default=100, help="fuzz cases per surface (CI runs 25)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "reliability")
    p.add_argument("--table-only", action="store_true", help="print the table of the last run without running")
    args = p.parse_args()
    if not args.table_only:
        seconds = run_suites(args.out, args.examples)
        print(f"suites ran in {seconds:.0f} s with {args.examples} cases per surface\n")
    print(table(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
