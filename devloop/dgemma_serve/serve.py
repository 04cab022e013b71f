"""`dgemma serve`: a gateway and N local worker processes in one command (the README's first step).

Without --model the small trained checkpoint that ships with the worker package is used, so it runs on
any laptop (it writes English words, not sense: docs/trained-model.md); the serving path is the real one.
`--demo` starts everything, sends one streamed chat request through the gateway, prints it as it arrives
and exits. `--autoscale` lets the operator's decision function start and retire workers as demand changes
(autoscale.py). `--overflow-url` adds a hosted OpenAI-compatible API that takes the requests the local
workers cannot serve in time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import secrets
import signal
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from dgemma_common import logsafe
from dgemma_gateway.app import GatewayServer
from dgemma_gateway.config import GatewayConfig, add_overflow_flags, overflow_from_args
from dgemma_gateway.core import GatewaySettings
from dgemma_gateway.endpoints import EndpointSource, StaticSource
from dgemma_gateway.openai_api import ApiLimits
from dgemma_gateway.types import Variant
from dgemma_operator.autoscaler import AutoscalingPolicy
from dgemma_serve.workers import LocalWorkers

VARIANT = "local"  # the one variant `dgemma serve` routes to (gateway and worker metrics name it alike)


def build_parser() -> argparse.ArgumentParser:
    """The `dgemma serve` parser."""
    p = argparse.ArgumentParser(prog="dgemma serve",
                                description="Run a gateway and local workers (the bundled trained model by default).")
    p.add_argument("--model", default=None,
                   help="checkpoint directory or hub id (default: the bundled small trained model)")
    p.add_argument("--served-model-name", default=None, help="name clients ask for (default: the model's basename)")
    p.add_argument("--replicas", type=int, default=1, help="worker processes (default 1)")
    p.add_argument("--host", default="127.0.0.1", help="gateway bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000; 0 picks one)")
    p.add_argument("--grpc-port", type=int, default=8001, help="KServe gRPC port (default 8001; 0 picks one; -1 off)")
    p.add_argument("--routing-profile", default="latency-target")
    p.add_argument("--api-keys-file", type=Path, default=None)
    p.add_argument("--max-active", type=int, default=None, help="requests each worker denoises at once")
    p.add_argument("--device", default=None, help="torch device of the workers")
    p.add_argument("--demo", action="store_true",
                   help="send one streamed request through the gateway, print it and exit")
    p.add_argument("--ready-timeout-s", type=float, default=600.0, help="how long the workers may take to load")
    p.add_argument("--drain-grace-s", type=float, default=30.0,
                   help="on Ctrl-C/SIGTERM, how long in-flight requests may run before the gateway and workers stop "
                        "(default 30)")
    a = p.add_argument_group("autoscaling", "scale the local workers with the operator's decision function")
    a.add_argument("--autoscale", action="store_true", help="start and stop workers as demand changes")
    a.add_argument("--min-replicas", type=int, default=1, help="fewest workers (0: scale to zero when idle)")
    a.add_argument("--max-replicas", type=int, default=4, help="most workers")
    a.add_argument("--autoscale-interval-s", type=float, default=2.0, help="seconds between decisions (default 2)")
    a.add_argument("--target-utilization", type=float, default=0.7, help="of measured capacity (default 0.7)")
    a.add_argument("--scale-up-window-s", type=float, default=0.0, help="scale-up stabilization window (0)")
    a.add_argument("--scale-down-window-s", type=float, default=30.0, help="scale-down stabilization window (30)")
    a.add_argument("--scale-to-zero-idle-s", type=float, default=60.0,
                   help="with --min-replicas 0: idle this long before the last worker stops (60)")
    a.add_argument("--demand-window-s", type=float, default=10.0, help="demand measurement window (10)")
    a.add_argument("--hold-for-replica-s", type=float, default=120.0,
                   help="hold requests this long while a first worker starts (120; 0: off)")
    o = p.add_argument_group("overflow", "send requests the local workers cannot serve in time to a hosted API")
    add_overflow_flags(lambda flag, dest, help_text, **kw: o.add_argument(flag, dest=dest, help=help_text, **kw))
    return p


def _example(url: str, model: str) -> str:
    body = json.dumps({"model": model, "stream": True, "max_tokens": 48,
                       "messages": [{"role": "user", "content": "Hello!"}]})
    return (
        f"  curl -N {url}/v1/chat/completions -H 'Content-Type: application/json' -d '{body}'\n\n"
        f"  python -c \"from openai import OpenAI; c = OpenAI(base_url='{url}/v1', api_key='none'); "
        f"print(c.chat.completions.create(model='{model}', max_tokens=48, "
        f"messages=[{{'role': 'user', 'content': 'Hello!'}}]).choices[0].message.content)\""
    )


async def demo_request(url: str, model: str, out: object = sys.stdout) -> int:
    """One streamed chat completion through the gateway, printed as its canvases arrive."""
    import aiohttp

    body = {"model": model, "stream": True, "max_tokens": 48, "seed": 0,
            "messages": [{"role": "user", "content": "Say hello in one sentence."}]}
    write = out.write  # type: ignore[attr-defined]
    async with aiohttp.ClientSession() as session, session.post(
        f"{url}/v1/chat/completions", json=body, timeout=aiohttp.ClientTimeout(total=300)
    ) as resp:
        if resp.status != 200:
            write(f"demo request failed: HTTP {resp.status}: {await resp.text()}\n")
            return 1
        write(f"POST {url}/v1/chat/completions (stream) -> 200, served by {resp.headers.get('x-dgemma-endpoint')}\n")
        usage = None
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if "error" in chunk:
                write(f"\nerror: {chunk['error']['message']}\n")
                return 1
            for choice in chunk.get("choices", []):
                text = choice.get("delta", {}).get("content")
                if text:
                    write(text)
                    getattr(out, "flush", lambda: None)()
            usage = chunk.get("usage") or usage
        write(f"\n[usage: {usage}]\n")
    return 0


def _check(args: argparse.Namespace) -> str | None:
    if args.autoscale:
        if not 0 <= args.min_replicas <= args.max_replicas or args.max_replicas < 1:
            return "--min-replicas and --max-replicas need 0 <= min <= max and max >= 1"
        if args.autoscale_interval_s <= 0 or args.demand_window_s <= 0 or not 0 < args.target_utilization <= 1:
            return "--autoscale-interval-s and --demand-window-s must be > 0, --target-utilization in (0, 1]"
    elif args.replicas < 1:
        return "--replicas must be >= 1"
    if args.drain_grace_s < 0:
        return "--drain-grace-s must be >= 0"
    return None


def _policy(args: argparse.Namespace) -> AutoscalingPolicy:
    return AutoscalingPolicy(
        min_replicas=args.min_replicas, max_replicas=args.max_replicas, target_utilization=args.target_utilization,
        scale_up_window_s=args.scale_up_window_s, scale_down_window_s=args.scale_down_window_s,
        scale_to_zero_idle_s=args.scale_to_zero_idle_s if args.min_replicas == 0 else None,
        # After missed targets, no scale-down for a while; never longer than the scale-down window itself.
        panic_window_s=min(60.0, args.scale_down_window_s), backlog_drain_s=max(1.0, args.demand_window_s))


def checkpoint_shape(model: str) -> dict[str, int]:
    """The variant settings a local checkpoint fixes: its canvas length and its default step cap.

    Read from its config files (JSON, no torch), so the gateway's idea of the default cap is the workers'
    own: a request's step share is learned per cap. A hub id or a file without them keeps the defaults.
    """
    out: dict[str, int] = {}
    for name, key, field in (("config.json", "canvas_length", "canvas_length"),
                             ("generation_config.json", "max_denoising_steps", "max_denoising_steps")):
        try:
            value = json.loads((Path(model) / name).read_text()).get(key)
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            out[field] = value
    return out


async def serve(args: argparse.Namespace) -> int:
    """Start workers and the gateway; serve until a signal, or run the demo."""
    from dgemma_serve.autoscale import LocalAutoscaler, LocalScalingSettings, LocalSource
    from dgemma_worker.checkpoints import BUNDLED_MODEL_DIR

    problem = _check(args)
    if problem is not None:
        print(f"dgemma serve: {problem}", file=sys.stderr)
        return 2
    if args.model is None:
        print("dgemma serve: no --model given: using the bundled small trained model (English words, not sense)",
              flush=True)
    model = args.model or str(BUNDLED_MODEL_DIR)
    served = args.served_model_name or Path(model.rstrip("/")).name or model
    try:
        overflow = overflow_from_args(args, served) if args.overflow_url else None
    except (ValueError, OSError) as exc:
        print(f"dgemma serve: {exc}", file=sys.stderr)
        return 2
    extra = [*(["--max-active", str(args.max_active)] if args.max_active else []),
             *(["--device", args.device] if args.device else [])]
    initial = min(max(args.replicas, args.min_replicas), args.max_replicas) if args.autoscale else args.replicas
    # A key for this run only, so that another user of this machine cannot use a worker's port directly: the
    # workers require it and the gateway in this process presents it.
    workers = LocalWorkers(model, initial, served, extra, variant=VARIANT, drain_grace_s=args.drain_grace_s,
                           api_key=secrets.token_urlsafe(32))
    server: GatewayServer | None = None
    scaler: asyncio.Task[None] | None = None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        workers.start()
        await asyncio.to_thread(workers.wait_bound)
        variant = Variant(name=VARIANT, model=served, gpu_profile="custom",
                          scale_from_zero=args.autoscale and args.min_replicas == 0,
                          allow_overflow=bool(args.overflow_url))
        shape = checkpoint_shape(model)
        variant = replace(variant, canvas_length=shape.get("canvas_length", variant.canvas_length),
                          max_denoising_steps=shape.get("max_denoising_steps", variant.max_denoising_steps))
        source = LocalSource(workers, variant)
        sources: list[EndpointSource] = [source]
        if overflow is not None:
            sources.append(StaticSource([overflow], name="overflow"))
        core = GatewaySettings(demand_window_s=args.demand_window_s,
                               hold_for_replica_s=args.hold_for_replica_s if args.autoscale else 0.0)
        config = GatewayConfig(host=args.host, port=args.port, grpc_port=args.grpc_port,
                               routing_profile=args.routing_profile, api_keys_file=args.api_keys_file,
                               limits=ApiLimits(), core=core)
        server = GatewayServer(config, sources)
        await server.start()
        shown = "127.0.0.1" if args.host in ("0.0.0.0", "::", "") else args.host
        url = f"http://{shown}:{server.port}"
        print(f"dgemma serve: gateway at {url} (OpenAI API under {url}/v1, KServe gRPC on port "
              f"{server.grpc_port}); loading {initial} worker(s) of {served!r}...", flush=True)
        waiting = asyncio.create_task(server.gateway.wait_ready(args.ready_timeout_s, initial, local=True))
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait({waiting, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if stop.is_set():
            waiting.cancel()
            return 0
        stopped.cancel()
        if not waiting.result():
            for w in workers.workers:
                print(f"worker {w.index} log:\n{workers.log_tail(w)}", file=sys.stderr)
            print("dgemma serve: the workers did not become ready in time", file=sys.stderr)
            return 1
        if args.autoscale:
            settings = LocalScalingSettings(_policy(args), args.autoscale_interval_s)
            scaler = asyncio.create_task(LocalAutoscaler(server.gateway, workers, source, settings).run())
            print(f"dgemma serve: autoscaling between {args.min_replicas} and {args.max_replicas} workers",
                  flush=True)
        print(f"dgemma serve: ready. Try:\n\n{_example(url, served)}\n", flush=True)
        if args.demo:
            return await demo_request(url, served)
        print("Ctrl-C stops the gateway and the workers.", flush=True)
        await stop.wait()
        print("\ndgemma serve: stopping...", flush=True)
        return 0
    finally:
        if scaler is not None:
            scaler.cancel()
            await asyncio.gather(scaler, return_exceptions=True)
        # Together: the workers finish what they hold (their own drain) while the gateway streams it out.
        await asyncio.gather(*([server.stop(grace_s=args.drain_grace_s)] if server is not None else []),
                             asyncio.to_thread(workers.stop))
        if workers.workdir is not None:
            with contextlib.suppress(OSError):
                for f in workers.workdir.iterdir():
                    f.unlink()
                workers.workdir.rmdir()


def run(argv: Sequence[str]) -> int:
    """`dgemma serve ...`."""
    args = build_parser().parse_args(list(argv))
    logsafe.install()  # the gateway runs in this process: client strings in its logs are escaped and bounded
    return asyncio.run(serve(args))
