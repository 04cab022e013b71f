"""`dgemma worker` settings: command-line flags, each with an environment variable the operator sets.

Flags win over environment variables, which win over the defaults here.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dgemma_common.envflags import fill_from_env
from dgemma_common.images import IMAGE_LIMIT_ENV, ImageLimits, add_image_limit_flags, image_limits_from
from dgemma_common.naming import WORKER_GRPC_PORT, WORKER_METRICS_PORT
from dgemma_common.params import GenerationParams, Limits
from dgemma_common.tls import TlsFiles, add_certificate_flags, tls_files
from dgemma_worker.checkpoints import BUNDLED_MODEL_DIR

# A prompt of max_prompt_tokens tokens is a few hundred kilobytes; 16 MiB leaves room for token-id
# prompts and KServe tensors while refusing absurd messages in the transport, before any tokenizing.
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
METRICS_OFF = -1
HEALTH_OFF = -1


@dataclass(frozen=True)
class WorkerConfig:
    """Everything the worker process needs to start."""

    model: str
    model_revision: str | None = None
    served_model_name: str = ""
    variant: str = ""  # the gateway's name for this variant (`namespace/name`): the `variant` metrics label
    host: str = "0.0.0.0"
    port: int = WORKER_GRPC_PORT
    metrics_port: int = WORKER_METRICS_PORT  # -1: no metrics endpoint; 0: pick a free port
    port_file: Path | None = None
    # TLS on the gRPC port (a client CA makes it mutual TLS) and the plaintext health-only port for kubelet
    # probes, which cannot speak TLS.
    tls: TlsFiles | None = None
    health_port: int = HEALTH_OFF  # -1: none; 0: pick a free port
    # API keys the Denoiser and KServe services require (the gateway's file format); None: no keys.
    api_keys_file: Path | None = None
    max_active: int = 4
    max_queue: int = 16
    dtype: str | None = None
    device: str | None = None
    drain_grace_s: float = 30.0
    log_format: str = "text"
    log_prompts: bool = False
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    limits: Limits = field(default_factory=Limits)
    image_limits: ImageLimits = field(default_factory=ImageLimits)
    # Request defaults set here; the rest come from the checkpoint's generation_config, then the published ones.
    default_overrides: Mapping[str, Any] = field(default_factory=dict)
    warmup: bool = True
    compile: bool | None = None  # the static-shape compiled step; None: on CUDA, off on a CPU
    debug_step_delay_s: float = 0.0  # tests and benchmarks only: a worker that steps like a slower GPU

    @property
    def model_name(self) -> str:
        """The name reported in metadata and load reports."""
        return self.served_model_name or Path(self.model.rstrip("/")).name or self.model


# flag dest -> environment variable
ENV_VARS = {
    "model": "DGEMMA_MODEL",
    "model_revision": "DGEMMA_MODEL_REVISION",
    "served_model_name": "DGEMMA_SERVED_MODEL_NAME",
    "variant": "DGEMMA_VARIANT",
    "host": "DGEMMA_HOST",
    "port": "DGEMMA_PORT",
    "metrics_port": "DGEMMA_METRICS_PORT",
    "port_file": "DGEMMA_PORT_FILE",
    "tls_cert_file": "DGEMMA_TLS_CERT_FILE",
    "tls_key_file": "DGEMMA_TLS_KEY_FILE",
    "tls_client_ca_file": "DGEMMA_TLS_CLIENT_CA_FILE",
    "health_port": "DGEMMA_HEALTH_PORT",
    "api_keys_file": "DGEMMA_API_KEYS_FILE",
    "max_active": "DGEMMA_MAX_ACTIVE",
    "max_queue": "DGEMMA_MAX_QUEUE",
    "dtype": "DGEMMA_DTYPE",
    "device": "DGEMMA_DEVICE",
    "drain_grace_s": "DGEMMA_DRAIN_GRACE_S",
    "log_format": "DGEMMA_LOG_FORMAT",
    "log_prompts": "DGEMMA_LOG_PROMPTS",
    "max_message_bytes": "DGEMMA_MAX_MESSAGE_BYTES",
    "max_new_tokens_limit": "DGEMMA_MAX_NEW_TOKENS",
    "max_denoising_steps_limit": "DGEMMA_MAX_DENOISING_STEPS",
    "max_prompt_tokens": "DGEMMA_MAX_PROMPT_TOKENS",
    **IMAGE_LIMIT_ENV,
    "max_prompt_bytes": "DGEMMA_MAX_PROMPT_BYTES",
    "default_max_new_tokens": "DGEMMA_DEFAULT_MAX_NEW_TOKENS",
    "default_max_denoising_steps": "DGEMMA_DEFAULT_MAX_DENOISING_STEPS",
    "default_t_min": "DGEMMA_DEFAULT_T_MIN",
    "default_t_max": "DGEMMA_DEFAULT_T_MAX",
    "default_entropy_bound": "DGEMMA_DEFAULT_ENTROPY_BOUND",
    "default_stability_threshold": "DGEMMA_DEFAULT_STABILITY_THRESHOLD",
    "default_confidence_threshold": "DGEMMA_DEFAULT_CONFIDENCE_THRESHOLD",
    "debug_step_delay_s": "DGEMMA_DEBUG_STEP_DELAY_S",
    "compile": "DGEMMA_COMPILE",
}


def _bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {value!r}")


def _port_or_off(value: str) -> int:
    if value.strip().lower() in ("off", "none", "-1"):
        return METRICS_OFF
    return int(value)


def build_parser() -> argparse.ArgumentParser:
    """The `dgemma worker` argument parser (defaults are filled from the environment later)."""
    p = argparse.ArgumentParser(
        prog="dgemma worker",
        description="Serve one DiffusionGemma model over gRPC (dgemma.v1.Denoiser, KServe v2, health).",
        epilog="Every option can also be set by the environment variable named in its help.",
    )

    def add(flag: str, dest: str, help_text: str, **kw: object) -> None:
        p.add_argument(flag, dest=dest, help=f"{help_text} [env {ENV_VARS[dest]}]", **kw)  # type: ignore[arg-type]

    add("--model", "model", "checkpoint directory or hub id (default: the bundled small trained model)")
    add("--model-revision", "model_revision", "hub revision of the checkpoint")
    add("--served-model-name", "served_model_name", "name reported to clients (default: model basename)")
    add("--variant", "variant", "the variant's name at the gateway (namespace/name in a cluster), put on every "
        "metric as the `variant` label")
    add("--host", "host", "bind address (default 0.0.0.0)")
    add("--port", "port", f"gRPC port; 0 picks a free one (default {WORKER_GRPC_PORT})", type=int)
    add("--metrics-port", "metrics_port",
        f"Prometheus port; 0 picks one, 'off' disables (default {WORKER_METRICS_PORT})",
        type=_port_or_off)
    add("--port-file", "port_file", "write the bound ports here as JSON once listening", type=Path)
    add_certificate_flags(add, "gRPC")
    add("--tls-client-ca-file", "tls_client_ca_file", "require client certificates signed by this PEM CA "
        "(mutual TLS; needs --tls-cert-file)", type=Path)
    add("--health-port", "health_port", "plaintext gRPC health-only port for kubelet probes when TLS is on; "
        "0 picks one, 'off' disables (default off)", type=_port_or_off)
    add("--api-keys-file", "api_keys_file", "file with one API key per line: calls to the Denoiser and KServe "
        "services need one (authorization: Bearer KEY or x-api-key metadata); health and reflection stay open "
        "(default: no keys)", type=Path)
    add("--max-active", "max_active", "requests denoised concurrently (default 4)", type=int)
    add("--max-queue", "max_queue", "requests waiting beyond --max-active (default 16)", type=int)
    add("--dtype", "dtype", "weights: float32/fp32, bfloat16/bf16, float16/fp16, or fp8/nvfp4 quantized at load "
        "on a GPU that supports them (default: bf16 on CUDA, fp32 on CPU)")
    add("--device", "device", "torch device, e.g. cuda:0 or cpu (default: cuda if available)")
    add("--drain-grace-s", "drain_grace_s", "on SIGTERM, how long in-flight requests may run (default 30)",
        type=float)
    add("--log-format", "log_format", "json or text (default text)", choices=["json", "text"])
    add("--log-prompts", "log_prompts", "include prompt and reply text in request logs (default off)",
        type=_bool, nargs="?", const=True)
    add("--max-message-bytes", "max_message_bytes", "largest gRPC message accepted or sent", type=int)
    add("--max-new-tokens", "max_new_tokens_limit", "upper bound a request may ask for", type=int)
    add("--max-denoising-steps", "max_denoising_steps_limit", "upper bound of max_denoising_steps a request may ask "
        "for (default 256)", type=int)
    add("--max-prompt-tokens", "max_prompt_tokens", "longest prompt accepted, in tokens (image tokens included)",
        type=int)
    add("--max-prompt-bytes", "max_prompt_bytes",
        "longest text or chat prompt tokenized at all, in UTF-8 bytes (default 16 x --max-prompt-tokens)", type=int)
    add_image_limit_flags(add)
    add("--default-max-new-tokens", "default_max_new_tokens", "default max_new_tokens", type=int)
    add("--default-max-denoising-steps", "default_max_denoising_steps", "default max_denoising_steps",
        type=int)
    add("--default-t-min", "default_t_min", "default t_min", type=float)
    add("--default-t-max", "default_t_max", "default t_max", type=float)
    add("--default-entropy-bound", "default_entropy_bound", "default entropy_bound", type=float)
    add("--default-stability-threshold", "default_stability_threshold", "default stability_threshold",
        type=int)
    add("--default-confidence-threshold", "default_confidence_threshold", "default confidence_threshold",
        type=float)
    add("--compile", "compile", "the static-shape compiled decoder step (torch.compile; CUDA graphs on CUDA); "
        "'false' for the eager step (default: on with CUDA, off on a CPU)", type=_bool, nargs="?", const=True)
    add("--debug-step-delay-s", "debug_step_delay_s", "tests and benchmarks only: add this many seconds to "
        "every denoising step, to act like a slower GPU (default 0)", type=float)
    p.add_argument("--no-warmup", dest="warmup", action="store_false", help="skip the warm-up generation")
    return p


def parse_config(argv: Sequence[str], env: Mapping[str, str] | None = None) -> WorkerConfig:
    """Flags, then environment, then defaults; exits with a usage error (code 2) on a bad value."""
    env = os.environ if env is None else env
    parser = build_parser()
    args = parser.parse_args(list(argv))
    fill_from_env(parser, args, ENV_VARS, env)
    if not args.model:
        args.model = str(BUNDLED_MODEL_DIR)

    limits = Limits()
    limits = Limits(
        max_new_tokens=args.max_new_tokens_limit or limits.max_new_tokens,
        max_denoising_steps=args.max_denoising_steps_limit or limits.max_denoising_steps,
        max_prompt_tokens=args.max_prompt_tokens or limits.max_prompt_tokens,
        max_prompt_bytes=args.max_prompt_bytes,
    )
    overrides = {
        name: getattr(args, f"default_{name}")
        for name in (
            "max_new_tokens",
            "max_denoising_steps",
            "t_min",
            "t_max",
            "entropy_bound",
            "stability_threshold",
            "confidence_threshold",
        )
        if getattr(args, f"default_{name}") is not None
    }
    from dgemma_common.params import ParamError, params_from_mapping

    try:
        params_from_mapping(overrides, GenerationParams(), limits)  # refuse a bad value now, not after loading
    except ParamError as exc:
        parser.error(f"default {exc}")
    try:
        tls = tls_files(args.tls_cert_file, args.tls_key_file, args.tls_client_ca_file, "--tls-cert-file")
    except ValueError as exc:
        parser.error(str(exc))
    cfg = WorkerConfig(
        model=args.model,
        model_revision=args.model_revision,
        served_model_name=args.served_model_name or "",
        variant=args.variant or "",
        host=args.host or "0.0.0.0",
        port=WORKER_GRPC_PORT if args.port is None else args.port,
        metrics_port=WORKER_METRICS_PORT if args.metrics_port is None else args.metrics_port,
        port_file=args.port_file,
        tls=tls,
        health_port=HEALTH_OFF if args.health_port is None else args.health_port,
        api_keys_file=args.api_keys_file,
        max_active=4 if args.max_active is None else args.max_active,
        max_queue=16 if args.max_queue is None else args.max_queue,
        dtype=args.dtype,
        device=args.device,
        drain_grace_s=30.0 if args.drain_grace_s is None else args.drain_grace_s,
        log_format=args.log_format or "text",
        log_prompts=bool(args.log_prompts),
        max_message_bytes=args.max_message_bytes or DEFAULT_MAX_MESSAGE_BYTES,
        limits=limits,
        default_overrides=overrides,
        image_limits=image_limits_from(args, parser),
        warmup=args.warmup,
        compile=args.compile,
        debug_step_delay_s=args.debug_step_delay_s or 0.0,
    )
    for name, value, lo in (("--max-active", cfg.max_active, 1), ("--max-queue", cfg.max_queue, 0),
                            ("--port", cfg.port, 0), ("--max-message-bytes", cfg.max_message_bytes, 1024)):
        if value < lo:
            parser.error(f"{name} must be >= {lo}, got {value}")
    if cfg.debug_step_delay_s < 0:
        parser.error(f"--debug-step-delay-s must be >= 0, got {cfg.debug_step_delay_s}")
    if cfg.drain_grace_s < 0:
        parser.error(f"--drain-grace-s must be >= 0, got {cfg.drain_grace_s}")
    return cfg

