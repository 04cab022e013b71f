"""`dgemma gateway` settings: flags, each with an environment variable; flags win."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from dgemma_common.auth import first_key, read_key_text
from dgemma_common.envflags import fill_from_env
from dgemma_common.images import IMAGE_LIMIT_ENV, add_image_limit_flags, image_limits_from
from dgemma_common.naming import GATEWAY_GRPC_PORT, GATEWAY_HTTP_PORT
from dgemma_common.tls import DEFAULT_RELOAD_S, TlsFiles, add_certificate_flags, tls_files
from dgemma_gateway.core import GatewaySettings
from dgemma_gateway.endpoints import EndpointSpec, WorkerTls, with_key
from dgemma_gateway.images import ImageSettings
from dgemma_gateway.openai_api import ApiLimits
from dgemma_gateway.openai_upstream import HttpTarget, http_base_url
from dgemma_gateway.remote_images import RemoteImageSettings
from dgemma_gateway.types import RUNTIMES, Variant


@dataclass(frozen=True)
class GatewayConfig:
    """Everything the gateway process needs."""

    host: str = "0.0.0.0"
    port: int = GATEWAY_HTTP_PORT
    grpc_port: int = GATEWAY_GRPC_PORT  # -1: no gRPC front
    routing_profile: str = "latency-target"
    api_keys_file: Path | None = None
    endpoints: tuple[EndpointSpec, ...] = ()
    kubernetes: bool = False
    namespace: str | None = None
    port_file: Path | None = None
    tls: TlsFiles | None = None  # HTTPS and gRPC over TLS on the front door
    worker_tls: WorkerTls | None = None  # TLS (mutual with a client certificate) to the workers
    tls_reload_s: float = DEFAULT_RELOAD_S  # how often certificate files are looked at for a renewal
    core: GatewaySettings = field(default_factory=GatewaySettings)
    limits: ApiLimits = field(default_factory=ApiLimits)


ENV = {
    "host": "DGEMMA_GATEWAY_HOST", "port": "DGEMMA_GATEWAY_PORT", "grpc_port": "DGEMMA_GATEWAY_GRPC_PORT",
    "routing_profile": "DGEMMA_ROUTING_PROFILE", "api_keys_file": "DGEMMA_API_KEYS_FILE",
    "endpoints_file": "DGEMMA_ENDPOINTS_FILE", "kubernetes": "DGEMMA_KUBERNETES",
    "namespace": "DGEMMA_NAMESPACE", "request_timeout_s": "DGEMMA_REQUEST_TIMEOUT_S",
    "max_body_bytes": "DGEMMA_MAX_BODY_BYTES", "max_prompt_tokens": "DGEMMA_MAX_PROMPT_TOKENS",
    "max_prompt_bytes": "DGEMMA_MAX_PROMPT_BYTES",
    "max_tokens": "DGEMMA_MAX_TOKENS", "default_max_tokens": "DGEMMA_DEFAULT_MAX_TOKENS", "max_n": "DGEMMA_MAX_N",
    "max_streams_per_key": "DGEMMA_MAX_STREAMS_PER_KEY", "sse_keepalive_s": "DGEMMA_SSE_KEEPALIVE_S",
    "hold_for_replica_s": "DGEMMA_HOLD_FOR_REPLICA_S", "demand_window_s": "DGEMMA_DEMAND_WINDOW_S",
    **IMAGE_LIMIT_ENV, "image_url_hosts": "DGEMMA_IMAGE_URL_HOSTS",
    "image_fetch_timeout_s": "DGEMMA_IMAGE_FETCH_TIMEOUT_S", "image_decode_slots": "DGEMMA_IMAGE_DECODE_SLOTS",
    "overflow_url": "DGEMMA_OVERFLOW_URL", "overflow_model": "DGEMMA_OVERFLOW_MODEL",
    "overflow_api_key_file": "DGEMMA_OVERFLOW_API_KEY_FILE",
    "overflow_max_concurrency": "DGEMMA_OVERFLOW_MAX_CONCURRENCY", "overflow_cost": "DGEMMA_OVERFLOW_COST",
    "tls_cert_file": "DGEMMA_TLS_CERT_FILE", "tls_key_file": "DGEMMA_TLS_KEY_FILE",
    "worker_tls_ca_file": "DGEMMA_WORKER_TLS_CA_FILE", "worker_tls_cert_file": "DGEMMA_WORKER_TLS_CERT_FILE",
    "worker_tls_key_file": "DGEMMA_WORKER_TLS_KEY_FILE", "worker_tls_server_name": "DGEMMA_WORKER_TLS_SERVER_NAME",
    "worker_api_key_file": "DGEMMA_WORKER_API_KEY_FILE",
}
# With --kubernetes, variants may scale to zero: hold their requests this long for a first replica.
KUBERNETES_HOLD_FOR_REPLICA_S = 120.0


HTTP_SCHEMES = ("http://", "https://")
# What an external API is assumed to deliver until the gateway has measured its requests (tokens/s), and what
# a request there costs relative to a local replica-second (it is only used when no local endpoint can serve).
EXTERNAL_TOKENS_PER_S_PRIOR = 1000.0
DEFAULT_OVERFLOW_COST = 5.0
DEFAULT_OVERFLOW_CONCURRENCY = 16


def http_spec(variant: Variant, url: str, target: HttpTarget) -> EndpointSpec:
    """The endpoint of an OpenAI-compatible server."""
    base = http_base_url(url)
    return EndpointSpec(f"{variant.name}/{base}", base, variant, http=replace(target, base_url=base))


def parse_endpoint(text: str, model: str = "") -> EndpointSpec:
    """`ADDRESS[=variant:model[:cost[:target_ms]]]`: a dgemma worker's `host:port`, or an OpenAI-compatible
    server's base URL (`http://10.0.0.7:8000/v1`, a vLLM server: its metrics are scraped when it has them)."""
    address, _, rest = text.partition("=")
    parts = rest.split(":") if rest else []
    variant = parts[0] if parts and parts[0] else "default"
    served = parts[1] if len(parts) > 1 and parts[1] else model
    if not served:
        raise ValueError(f"endpoint {text!r}: name the model (host:port=variant:model) or pass --model")
    cost = float(parts[2]) if len(parts) > 2 and parts[2] else 1.0
    target = float(parts[3]) if len(parts) > 3 and parts[3] else 2000.0
    v = Variant(name=variant, model=served, cost_weight=cost, latency_target_ms=target)
    if address.startswith(HTTP_SCHEMES):
        return http_spec(replace(v, runtime="vllm"), address, HttpTarget(address, served))
    if "://" in address:
        raise ValueError(f"endpoint {text!r}: a worker is host:port, an OpenAI-compatible server http(s)://...")
    return EndpointSpec(f"{variant}/{address}", address, v)


# Keys of an endpoints-file variant that describe its HTTP endpoints rather than the variant itself.
_HTTP_KEYS = ("upstream_model", "api_key_file", "max_concurrency", "max_queue")


def load_endpoints_file(path: Path) -> list[EndpointSpec]:
    """A YAML list of variants, each with its endpoints:

    variants:
      - {name: fast, model: m, gpu_profile: h100, cost_weight: 3, latency_target_ms: 500,
         canvas_length: 256, endpoints: ["10.0.0.1:50051"]}
      - {name: vllm-h100, model: m, runtime: vllm, max_concurrency: 4, endpoints: ["http://10.0.0.7:8000/v1"]}
      - {name: hosted, model: m, runtime: external, upstream_model: google/diffusiongemma-26B-A4B-it,
         api_key_file: /secrets/key, max_concurrency: 16, cost_weight: 5, endpoints: ["https://api.example/v1"]}
    """
    data = yaml.safe_load(path.read_text()) or {}
    out: list[EndpointSpec] = []
    for v in data.get("variants", []):
        addresses = v.pop("endpoints", [])
        extra = {k: v.pop(k) for k in _HTTP_KEYS if k in v}
        variant = Variant(**v)
        if variant.runtime not in RUNTIMES:
            raise ValueError(f"variant {variant.name!r}: runtime must be one of {list(RUNTIMES)}")
        for address in addresses:
            out.append(_file_endpoint(variant, str(address), extra))
    return out


def _file_endpoint(variant: Variant, address: str, extra: dict[str, object]) -> EndpointSpec:
    is_http = address.startswith(HTTP_SCHEMES)
    if is_http == (variant.runtime == "dgemma"):
        raise ValueError(f"variant {variant.name!r}: a {variant.runtime} endpoint is "
                         f"{'a host:port' if variant.runtime == 'dgemma' else 'an http(s) base URL'}, not {address!r}")
    if not is_http:
        return EndpointSpec(f"{variant.name}/{address}", address, variant)
    key_file = extra.get("api_key_file")
    concurrency = int(str(extra.get("max_concurrency", DEFAULT_OVERFLOW_CONCURRENCY if variant.overflow else 4)))
    target = HttpTarget(address, str(extra.get("upstream_model") or variant.model),
                        capacity=concurrency, max_queue=int(str(extra.get("max_queue", 0 if variant.overflow else 16))),
                        scrape=variant.runtime == "vllm")
    spec = http_spec(variant, address, target)
    return keyed_by(spec, Path(str(key_file))) if key_file else spec


def read_api_key(path: Path) -> str:
    """The key a client presents from a key file (a mounted Secret): its first key, by the one rule of
    `dgemma_common.auth` (whitespace, blank lines and # lines are no part of it); ValueError if it holds none."""
    key = first_key(read_key_text(path))
    if key is None:
        raise ValueError(f"{path} holds no API key")
    return key


def keyed_by(spec: EndpointSpec, key_file: Path) -> EndpointSpec:
    """The endpoint with the key of `key_file`, read now; the static source reads the file again when it changes
    (a rotated Secret), so the key is never only the one read at start."""
    return replace(with_key(spec, read_api_key(key_file)), key_file=key_file)


def with_worker_key(specs: Sequence[EndpointSpec], key_file: Path) -> list[EndpointSpec]:
    """The endpoints with the workers' API key: every dgemma worker, and every vLLM server that has no key of its
    own (as `Authorization: Bearer`). Never an external API: the key is ours, not a third party's."""
    def wants(s: EndpointSpec) -> bool:
        return s.http is None or (s.variant.runtime == "vllm" and s.key_file is None)

    return [keyed_by(s, key_file) if wants(s) else s for s in specs]


def overflow_spec(url: str, upstream_model: str, served_as: str, key_file: Path | None = None,
                  max_concurrency: int = DEFAULT_OVERFLOW_CONCURRENCY, cost: float = DEFAULT_OVERFLOW_COST,
                  latency_target_ms: float = 2000.0) -> EndpointSpec:
    """The external API of `--overflow-url`: a variant with no pods, used only when local endpoints fall short."""
    variant = Variant(name="overflow", model=served_as, gpu_profile="external", cost_weight=cost,
                      latency_target_ms=latency_target_ms, tokens_per_s_prior=EXTERNAL_TOKENS_PER_S_PRIOR,
                      runtime="external")
    target = HttpTarget(url, upstream_model, capacity=max_concurrency, max_queue=0, scrape=False)
    spec = http_spec(variant, url, target)
    return keyed_by(spec, key_file) if key_file else spec


def allow_overflow(specs: Sequence[EndpointSpec], model: str) -> list[EndpointSpec]:
    """The local endpoints of `model` opted in to overflow (giving --overflow-url is the opt-in)."""
    return [replace(s, variant=replace(s.variant, allow_overflow=True))
            if s.variant.model == model and not s.variant.overflow else s for s in specs]


def add_overflow_flags(add: Callable[..., object]) -> None:
    """The --overflow-* flags, shared by `dgemma gateway` and `dgemma serve`."""
    add("--overflow-url", "overflow_url",
        "an external OpenAI-compatible API (base URL) that takes requests no local endpoint can serve in time")
    add("--overflow-model", "overflow_model", "the model's name on the --overflow-url service")
    add("--overflow-api-key-file", "overflow_api_key_file", "file holding the --overflow-url API key", type=Path)
    add("--overflow-max-concurrency", "overflow_max_concurrency",
        f"requests in flight at the --overflow-url service at most (default {DEFAULT_OVERFLOW_CONCURRENCY})",
        type=int)
    add("--overflow-cost", "overflow_cost",
        f"cost weight of the overflow variant (default {DEFAULT_OVERFLOW_COST:g})", type=float)


def overflow_from_args(args: argparse.Namespace, served_as: str) -> EndpointSpec:
    """The overflow endpoint the --overflow-* flags describe (--overflow-url given); ValueError if incomplete."""
    if not args.overflow_model:
        raise ValueError("--overflow-url needs --overflow-model (the model's name on that service)")
    concurrency = DEFAULT_OVERFLOW_CONCURRENCY if args.overflow_max_concurrency is None \
        else args.overflow_max_concurrency
    cost = DEFAULT_OVERFLOW_COST if args.overflow_cost is None else args.overflow_cost
    if concurrency < 1 or cost <= 0:
        raise ValueError("--overflow-max-concurrency must be >= 1 and --overflow-cost > 0")
    return overflow_spec(args.overflow_url, args.overflow_model, served_as, args.overflow_api_key_file,
                         concurrency, cost)


def build_parser() -> argparse.ArgumentParser:
    """The `dgemma gateway` parser."""
    p = argparse.ArgumentParser(prog="dgemma gateway", description="OpenAI and KServe front for dgemma workers.",
                                epilog="Every option can also be set by the environment variable in its help.")

    def add(flag: str, dest: str, help_text: str, **kw: object) -> None:
        env = ENV.get(dest)
        p.add_argument(flag, dest=dest, help=f"{help_text}" + (f" [env {env}]" if env else ""), **kw)  # type: ignore[arg-type]

    add("--host", "host", "bind address (default 0.0.0.0)")
    add("--port", "port", f"HTTP port (default {GATEWAY_HTTP_PORT}; 0 picks one)", type=int)
    add("--grpc-port", "grpc_port", f"KServe gRPC port (default {GATEWAY_GRPC_PORT}; 0 picks one; -1 off)", type=int)
    add("--routing-profile", "routing_profile",
        "latency-target, least-loaded, round-robin or a YAML file (default latency-target)")
    add("--api-keys-file", "api_keys_file", "file with one API key per line (default: no keys)", type=Path)
    add("--endpoint", "endpoint", "static endpoint: a worker's host:port, or an OpenAI-compatible (vLLM) base URL "
        "http(s)://host:port/v1, then [=variant:model[:cost[:target_ms]]] (repeatable)", action="append", default=[])
    add("--model", "model", "served model name of --endpoint entries that name none")
    add("--endpoints-file", "endpoints_file", "YAML file of variants and their endpoints", type=Path)
    add("--kubernetes", "kubernetes", "discover DiffusionGemma variants and their worker pods in the cluster",
        action="store_true", default=None)
    add("--namespace", "namespace", "namespace(s) to watch, comma-separated (default: all)")
    add("--port-file", "port_file", "write the bound ports here as JSON once listening", type=Path)
    add_certificate_flags(add, "HTTP and gRPC")
    add("--worker-tls-ca-file", "worker_tls_ca_file", "speak TLS to the workers, whose certificates chain to this "
        "PEM CA", type=Path)
    add("--worker-tls-cert-file", "worker_tls_cert_file", "client certificate presented to the workers (mutual "
        "TLS; needs --worker-tls-ca-file)", type=Path)
    add("--worker-tls-key-file", "worker_tls_key_file", "the PEM key of --worker-tls-cert-file", type=Path)
    add("--worker-tls-server-name", "worker_tls_server_name", "the name the workers' certificates carry (default: "
        "the address dialled)")
    add("--worker-api-key-file", "worker_api_key_file", "file whose first line is the API key the static endpoints' "
        "workers require (their --api-keys-file): sent on every call to a dgemma worker, and as Authorization: "
        "Bearer to vLLM endpoints without a key of their own; read again when it changes", type=Path)
    add("--request-timeout-s", "request_timeout_s", "deadline of a request (default 600)", type=float)
    add("--max-body-bytes", "max_body_bytes", "largest request body, images included (default 16 MiB)", type=int)
    add("--max-prompt-tokens", "max_prompt_tokens", "longest prompt (default 32768)", type=int)
    add("--max-prompt-bytes", "max_prompt_bytes", "longest prompt text in UTF-8 bytes, refused before it is "
        "tokenized or sent to a worker (default 16 x --max-prompt-tokens, as the workers')", type=int)
    add("--max-tokens", "max_tokens", "largest max_tokens (default 8192)", type=int)
    add("--default-max-tokens", "default_max_tokens", "max_tokens when a request gives none (default 256)",
        type=int)
    add("--max-n", "max_n", "largest n (default 4)", type=int)
    add("--max-streams-per-key", "max_streams_per_key", "concurrent requests per API key (default 64; 0: no limit)",
        type=int)
    add("--sse-keepalive-s", "sse_keepalive_s",
        "a stream silent this long gets its headers and an SSE comment, and one more each time again (default 2)",
        type=float)
    add("--hold-for-replica-s", "hold_for_replica_s",
        "hold a request up to this long while a model's first replica starts (scale from zero); 0: off "
        f"(default {KUBERNETES_HOLD_FOR_REPLICA_S:g} with --kubernetes, else 0)", type=float)
    add("--demand-window-s", "demand_window_s", "window of the demand measurements for the autoscaler (default 60)",
        type=float)
    add_image_limit_flags(add)
    add("--image-url-hosts", "image_url_hosts",
        "hosts whose http(s) image URLs the gateway fetches, comma-separated; '*.example.com' allows its "
        "subdomains (default: none, only data: URLs)")
    add("--image-fetch-timeout-s", "image_fetch_timeout_s", "time limit of one image fetch (default 5)", type=float)
    add("--image-decode-slots", "image_decode_slots", "images checked at once (default 2); bounds decode memory",
        type=int)
    add_overflow_flags(add)
    return p


def image_settings_from(args: argparse.Namespace, parser: argparse.ArgumentParser) -> ImageSettings:
    """Image limits, remote image URLs and decode slots from the flags."""
    d = ImageSettings()
    hosts = tuple(h.strip() for h in (args.image_url_hosts or "").split(",") if h.strip())
    timeout = d.remote.timeout_s if args.image_fetch_timeout_s is None else args.image_fetch_timeout_s
    slots = d.decode_slots if args.image_decode_slots is None else args.image_decode_slots
    if timeout <= 0 or slots < 1:
        parser.error("--image-fetch-timeout-s must be > 0 and --image-decode-slots >= 1")
    return ImageSettings(limits=image_limits_from(args, parser),
                         remote=RemoteImageSettings(allowed_hosts=hosts, timeout_s=timeout), decode_slots=slots)


def _only_model(specs: Sequence[EndpointSpec]) -> str | None:
    models = {s.variant.model for s in specs}
    return models.pop() if len(models) == 1 else None


def _tls(args: argparse.Namespace) -> tuple[TlsFiles | None, WorkerTls | None]:
    """The front door's certificate and the worker side's settings from the flags."""
    front = tls_files(args.tls_cert_file, args.tls_key_file, what="--tls-cert-file")
    client = tls_files(args.worker_tls_cert_file, args.worker_tls_key_file, what="--worker-tls-cert-file")
    if args.worker_tls_ca_file is None:
        if client is not None or args.worker_tls_server_name:
            raise ValueError("--worker-tls-cert-file and --worker-tls-server-name need --worker-tls-ca-file")
        return front, None
    return front, WorkerTls(args.worker_tls_ca_file, client, args.worker_tls_server_name or None)


def parse_config(argv: Sequence[str], env: Mapping[str, str] | None = None) -> GatewayConfig:
    """Flags, then environment, then defaults."""
    env = os.environ if env is None else env
    parser = build_parser()
    args = parser.parse_args(list(argv))
    fill_from_env(parser, args, ENV, env)
    endpoints: list[EndpointSpec] = []
    try:
        endpoints += [parse_endpoint(e, args.model or "") for e in args.endpoint]
        if args.endpoints_file is not None:
            endpoints += load_endpoints_file(args.endpoints_file)
        if args.worker_api_key_file is not None:
            endpoints = with_worker_key(endpoints, args.worker_api_key_file)
        if args.overflow_url:
            served = args.model or _only_model(endpoints) or args.overflow_model or ""
            endpoints = [*allow_overflow(endpoints, served), overflow_from_args(args, served)]
    except (ValueError, TypeError, OSError) as exc:
        parser.error(str(exc))
    if not endpoints and not args.kubernetes:
        parser.error("give --endpoint, --endpoints-file, --overflow-url or --kubernetes")
    d = ApiLimits()
    limits = ApiLimits(
        max_body_bytes=args.max_body_bytes or d.max_body_bytes,
        max_prompt_tokens=args.max_prompt_tokens or d.max_prompt_tokens,
        max_prompt_bytes=args.max_prompt_bytes,
        max_tokens=args.max_tokens or d.max_tokens,
        default_max_tokens=args.default_max_tokens or d.default_max_tokens,
        max_n=args.max_n or d.max_n,
        max_streams_per_key=d.max_streams_per_key if args.max_streams_per_key is None else args.max_streams_per_key,
        sse_keepalive_s=args.sse_keepalive_s or d.sse_keepalive_s,
        images=image_settings_from(args, parser),
    )
    try:
        tls, worker_tls = _tls(args)
    except ValueError as exc:
        parser.error(str(exc))
    hold = args.hold_for_replica_s
    if hold is None:
        hold = KUBERNETES_HOLD_FOR_REPLICA_S if args.kubernetes else 0.0
    if limits.max_prompt_bytes is not None and limits.max_prompt_bytes < 1:
        parser.error("--max-prompt-bytes must be >= 1")
    if limits.sse_keepalive_s < 0.05:
        parser.error("--sse-keepalive-s must be >= 0.05")
    if hold < 0 or (args.demand_window_s is not None and args.demand_window_s <= 0):
        parser.error("--hold-for-replica-s must be >= 0 and --demand-window-s > 0")
    core = GatewaySettings(request_timeout_s=args.request_timeout_s or GatewaySettings().request_timeout_s,
                           hold_for_replica_s=hold,
                           demand_window_s=args.demand_window_s or GatewaySettings().demand_window_s)
    return GatewayConfig(
        host=args.host or "0.0.0.0",
        port=GATEWAY_HTTP_PORT if args.port is None else args.port,
        grpc_port=GATEWAY_GRPC_PORT if args.grpc_port is None else args.grpc_port,
        routing_profile=args.routing_profile or "latency-target",
        api_keys_file=args.api_keys_file,
        endpoints=tuple(endpoints),
        kubernetes=bool(args.kubernetes),
        namespace=args.namespace,
        port_file=args.port_file,
        tls=tls,
        worker_tls=worker_tls,
        core=core,
        limits=limits,
    )
