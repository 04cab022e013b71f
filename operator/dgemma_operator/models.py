"""The DiffusionGemma custom resource as typed models: the one source of truth for the CRD schema.

Attribute docstrings become the schema's descriptions (so `kubectl explain` helps), field bounds
and literals become bounds and enums, and `x-kubernetes-validations` carry the CEL rules.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from dgemma_common import variants, vllm
from dgemma_common.naming import GROUP as GROUP  # the resource's names, re-exported for the operator
from dgemma_common.naming import KIND as KIND
from dgemma_common.naming import PLURAL as PLURAL
from dgemma_common.naming import VERSION as VERSION
from dgemma_common.profiles import Architecture, Dtype, ProfileName
from dgemma_common.variants import Runtime

# Generation settings vLLM reads from the checkpoint, not from its command line (dgemma_common.vllm).
VLLM_FIXED_SETTINGS = ("tMin", "tMax", "entropyBound", "stabilityThreshold", "confidenceThreshold")

SINGULAR = "diffusiongemma"
SHORT_NAMES = ["dgm"]
CATEGORIES = ["dgemma", "all-models"]


def _config(*rules: tuple[str, str]) -> ConfigDict:
    extra: dict[str, Any] = {}
    if rules:
        extra["x-kubernetes-validations"] = [{"rule": rule, "message": message} for rule, message in rules]
    return ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        use_attribute_docstrings=True,
        extra="ignore",
        frozen=True,
        json_schema_extra=extra or None,
    )


def _object_default() -> Any:
    # The API server applies nested defaults only when the parent object exists; `{}` makes it exist.
    return {"default": {}}


class HuggingFaceSource(BaseModel):
    """A model on the Hugging Face Hub."""

    model_config = _config()
    id: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9._-]+)?$")
    """Repository id, e.g. google/diffusiongemma-26B-A4B-it."""
    revision: str = Field(default="main", min_length=1, max_length=100)
    """Branch, tag or commit to pin."""


class PvcSource(BaseModel):
    """Weights already present on a PersistentVolumeClaim (mounted read-only)."""

    model_config = _config()
    claim_name: str = Field(min_length=1, max_length=253)
    """Name of the PersistentVolumeClaim in the resource's namespace."""
    path: str = Field(default="/", max_length=1024)
    """Directory inside the claim that holds config.json and the safetensors files."""


class SecretKeyRef(BaseModel):
    """A key of a Secret in the resource's namespace."""

    model_config = _config()
    name: str = Field(min_length=1, max_length=253)
    """Secret name."""
    key: str = Field(default="token", min_length=1, max_length=253)
    """Key inside the Secret."""


class ModelSource(BaseModel):
    """Where the weights come from: exactly one of huggingFace, pvc or url."""

    model_config = _config(
        (
            "has(self.huggingFace) || has(self.pvc) || has(self.url)",
            "one of huggingFace, pvc or url is required",
        ),
        (
            "!(has(self.huggingFace) && has(self.pvc)) && !(has(self.huggingFace) && has(self.url))"
            " && !(has(self.pvc) && has(self.url))",
            "only one of huggingFace, pvc or url may be set",
        ),
    )
    hugging_face: HuggingFaceSource | None = None
    """Fetch from the Hugging Face Hub."""
    pvc: PvcSource | None = None
    """Load from a PersistentVolumeClaim."""
    url: str | None = Field(default=None, pattern=r"^(https?|s3|gs)://.+", max_length=2048)
    """Fetch an archive of the checkpoint from this URL (http, https, s3 or gs)."""
    token_secret: SecretKeyRef | None = None
    """Secret holding the Hub token (becomes HF_TOKEN); needed for gated models."""


class CacheSpec(BaseModel):
    """The model cache: weights are fetched once by an init container into it and shared by the pods."""

    model_config = _config()
    claim_name: str | None = Field(default=None, max_length=253)
    """PersistentVolumeClaim (ReadWriteMany) shared by all replicas; empty: a per-pod emptyDir."""
    mount_path: str = Field(default="/models", pattern=r"^/.*", max_length=1024)
    """Where the cache is mounted; HF_HOME points below it."""
    size_limit: str = Field(default="200Gi", pattern=r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti)?$")
    """Size limit of the emptyDir when no claim is given."""


class GpuSpec(BaseModel):
    """Which GPUs to run on: a named profile whose every default can be overridden."""

    model_config = _config()
    profile: ProfileName = variants.DEFAULT_GPU_PROFILE
    """GPU profile: rtx-pro-6000, h100, dgx-spark, dgx-station or custom."""
    product: str | None = Field(default=None, max_length=63)
    """Override of the nvidia.com/gpu.product node label (GPU Feature Discovery); required for custom."""
    count: int = Field(default=1, ge=1, le=8)
    """GPUs per replica (nvidia.com/gpu)."""
    architecture: Architecture | None = None
    """CPU architecture (kubernetes.io/arch); default from the profile."""
    dtype: Dtype | None = None
    """Weights dtype/quantization; default from the profile (h100 fp8, others bf16)."""
    node_selector: dict[str, str] | None = None
    """Extra node selector terms, merged over the profile's."""
    tolerations: list[dict[str, Any]] | None = None
    """Tolerations replacing the profile's (default: tolerate nvidia.com/gpu taints)."""
    affinity: dict[str, Any] | None = None
    """Pod affinity/anti-affinity (core/v1 Affinity)."""
    resources: dict[str, Any] | None = None
    """Container resources (core/v1 ResourceRequirements) merged over the profile's."""
    tokens_per_second_prior: float | None = Field(default=None, gt=0, le=100000)
    """Expected tokens/s per replica, used for routing and scaling until measured."""


class GenerationDefaults(BaseModel):
    """Generation defaults the workers apply when a request does not say."""

    model_config = _config(
        ("!has(self.tMin) || !has(self.tMax) || self.tMin <= self.tMax", "tMin must not exceed tMax"),
    )
    canvas_length: int = Field(default=variants.DEFAULT_CANVAS_LENGTH, ge=16, le=4096)
    """Tokens per canvas (block)."""
    max_denoising_steps: int = Field(default=variants.DEFAULT_MAX_DENOISING_STEPS, ge=1, le=512)
    """Upper bound on denoising steps per canvas."""
    t_min: float | None = Field(default=None, ge=0, le=10)
    """Final sampling temperature of the schedule."""
    t_max: float | None = Field(default=None, ge=0, le=10)
    """Initial sampling temperature of the schedule."""
    entropy_bound: float | None = Field(default=None, ge=0)
    """Entropy bound for accepting tokens per step."""
    stability_threshold: int | None = Field(default=None, ge=1, le=512)
    """Steps the argmax canvas must stay unchanged before a row stops."""
    confidence_threshold: float | None = Field(default=None, ge=0, le=1)
    """Confidence a row needs before it may stop."""


class KeySelector(BaseModel):
    """A key of a Secret or ConfigMap in the resource's namespace (core/v1 SecretKeySelector, ConfigMapKeySelector)."""

    model_config = _config()
    name: str = Field(min_length=1, max_length=253)
    """Name of the Secret or ConfigMap."""
    key: str = Field(min_length=1, max_length=253)
    """The key to read."""
    optional: bool | None = None
    """Whether the container may start without it."""


class FieldSelector(BaseModel):
    """A field of the pod (core/v1 ObjectFieldSelector), e.g. metadata.name or status.podIP."""

    model_config = _config()
    field_path: str = Field(min_length=1, max_length=256)
    """Path of the field, e.g. metadata.name."""
    api_version: str | None = Field(default=None, max_length=64)
    """Version of the schema the path is written in (default v1)."""


class ResourceFieldSelector(BaseModel):
    """A resource limit or request of the container (core/v1 ResourceFieldSelector)."""

    model_config = _config()
    resource: str = Field(min_length=1, max_length=253)
    """e.g. limits.memory."""
    container_name: str | None = Field(default=None, max_length=253)
    """Container whose resource is read (default this one)."""
    divisor: str | None = Field(default=None, pattern=r"^[0-9]+(\.[0-9]+)?([numkMGTPE]|Ki|Mi|Gi|Ti|Pi|Ei)?$",
                                max_length=64)
    """Output unit, a quantity such as 1Mi (default 1)."""


ENV_SOURCES = ("secretKeyRef", "configMapKeyRef", "fieldRef", "resourceFieldRef")


class EnvVarSource(BaseModel):
    """Where a variable's value comes from (core/v1 EnvVarSource): exactly one source."""

    model_config = _config(
        (" || ".join(f"has(self.{s})" for s in ENV_SOURCES),
         "valueFrom needs one of secretKeyRef, configMapKeyRef, fieldRef or resourceFieldRef"),
        (" && ".join(f"!(has(self.{a}) && has(self.{b}))"
                     for i, a in enumerate(ENV_SOURCES) for b in ENV_SOURCES[i + 1:]),
         "valueFrom takes only one of secretKeyRef, configMapKeyRef, fieldRef or resourceFieldRef"),
    )
    secret_key_ref: KeySelector | None = None
    """A key of a Secret."""
    config_map_key_ref: KeySelector | None = None
    """A key of a ConfigMap."""
    field_ref: FieldSelector | None = None
    """A field of the pod."""
    resource_field_ref: ResourceFieldSelector | None = None
    """A resource of the container."""


class EnvVar(BaseModel):
    """An environment variable of the worker container (core/v1 EnvVar)."""

    model_config = _config(("!(has(self.value) && has(self.valueFrom))", "give value or valueFrom, not both"))
    name: str = Field(min_length=1, max_length=256, pattern=r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
    """Variable name."""
    value: str | None = Field(default=None, max_length=32768)
    """Its value; $(NAME) expands a variable defined before it, the operator's included."""
    value_from: EnvVarSource | None = None
    """Where its value comes from instead."""


class WorkerSpec(BaseModel):
    """Per-replica serving limits and lifecycle."""

    model_config = _config()
    max_active: int = Field(default=4, ge=1, le=256)
    """Sequences denoised concurrently by one replica."""
    max_queue: int = Field(default=64, ge=0, le=100000)
    """Requests waiting per replica before RESOURCE_EXHAUSTED."""
    drain_grace_seconds: int = Field(default=30, ge=0, le=3600)
    """How long a terminating replica finishes in-flight requests."""
    startup_timeout_seconds: int = Field(default=1800, ge=60, le=7200)
    """Time allowed for fetching and loading the weights before the pod is restarted."""
    log_format: Literal["json", "text"] = "json"
    """Worker log format."""
    tls_secret: str | None = Field(default=None, min_length=1, max_length=253)
    """Secret (type kubernetes.io/tls with tls.crt, tls.key and ca.crt, as cert-manager writes it) that makes the
    worker serve mutual TLS: its certificate, and the CA that clients' certificates must chain to. The gateway needs
    a client certificate from that CA (the chart's internalTLS issues both). Probes move to a plaintext
    health-only port."""
    api_key_secret: SecretKeyRef | None = None
    """A key of a Secret holding the API key the workers require (runtimes dgemma and vllm): every call to a
    dgemma worker's Denoiser and KServe services, every vLLM request under /v1, needs it; health, probes and
    metrics stay open. The gateway reads the same Secret and presents the key (give it `get` on the Secret: the
    chart's gateway.apiKeySecrets). Read as every dgemma key file is: one key per line (a trailing newline, blank
    lines and # lines are no part of a key); the gateway presents the first. dgemma workers accept every key listed
    and re-read the Secret (list a new key beside the old one to rotate without a restart); vLLM is started with
    the first key (a pod reads it when it starts) and does not start without one."""
    env: list[EnvVar] | None = Field(default=None, max_length=64, json_schema_extra={
        "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]})
    """More environment variables of the server container (dgemma worker or vLLM), e.g. OTEL_EXPORTER_OTLP_ENDPOINT
    for traces; after the operator's own, whose names they may not take (the resource is Degraded, naming
    them)."""


class VllmSpec(BaseModel):
    """vLLM's OpenAI server as the runtime (runtime: vllm): what is tuned per variant."""

    model_config = _config()
    image: str = Field(default=vllm.IMAGE, min_length=1, max_length=512)
    """vLLM image (the contract dgemma is pinned to is vLLM 0.24.0's: metric names, /health, flags)."""
    max_num_seqs: int | None = Field(default=None, ge=1, le=256)
    """Sequences one replica runs at once (--max-num-seqs); default from the GPU profile, as vLLM's DiffusionGemma
    recipe gives it (4, which an 80 GB GPU needs; 8 on DGX Spark)."""
    gpu_memory_utilization: float | None = Field(default=None, gt=0, le=1)
    """Share of GPU memory vLLM may take (--gpu-memory-utilization); default from the profile (0.85; 0.8 on
    DGX Spark)."""
    tensor_parallel_size: int | None = Field(default=None, ge=1, le=8)
    """GPUs one replica's model is split over (--tensor-parallel-size); default gpu.count."""
    max_model_len: int | None = Field(default=None, ge=256, le=1048576)
    """Longest prompt plus completion in tokens (--max-model-len); default the model's."""
    extra_args: list[Annotated[str, Field(max_length=1024)]] | None = Field(default=None, max_length=64)
    """More `vllm serve` arguments, after the operator's (a later flag wins, so these override)."""


class ExternalSpec(BaseModel):
    """An external OpenAI-compatible API (runtime: external): nothing runs in the cluster; the gateway sends it
    the requests no local variant of the model can serve in time, from variants that allow it."""

    model_config = _config()
    base_url: str = Field(alias="baseURL", pattern=r"^https?://[^\s/?#]+(/[^\s?#]*)?$", max_length=2048)
    """The API root: http(s)://host[:port]/path, usually ending in /v1 (chat and text completions are under
    it)."""
    model: str = Field(min_length=1, max_length=200)
    """The model's name on that service."""
    api_key_secret: SecretKeyRef | None = None
    """Secret holding the API key (sent as a bearer token); the gateway reads it."""
    max_concurrency: int = Field(default=16, ge=1, le=10000)
    """Requests in flight there at most (its rate limit); more wait for a local endpoint or are refused."""


class AutoscalingSpec(BaseModel):
    """How the autoscaler (not this operator) may change spec.replicas."""

    model_config = _config()
    enabled: bool = False
    """Let the dgemma autoscaler set spec.replicas between minReplicas and maxReplicas."""
    target_utilization: float = Field(default=0.8, gt=0, le=1)
    """Fraction of measured capacity a replica should run at."""
    scale_up_stabilization_seconds: int = Field(default=30, ge=0, le=3600)
    """Window over which scale-up decisions take the lowest recommendation (a burst must last this long);
    missed targets and scale-from-zero do not wait for it."""
    scale_down_stabilization_seconds: int = Field(default=300, ge=0, le=86400)
    """Window over which scale-down decisions take the highest recommendation."""
    scale_to_zero: bool = False
    """Allow zero replicas when idle (needs minReplicas 0; the gateway holds requests while one starts)."""
    scale_to_zero_idle_seconds: int = Field(default=600, ge=0, le=604800)
    """With scaleToZero: no demand for this long before the last replica goes."""
    max_scale_up_step: int = Field(default=4, ge=1, le=1000)
    """Replicas added per decision at most."""
    max_scale_down_step: int = Field(default=1, ge=1, le=1000)
    """Replicas removed per decision at most."""


class DiffusionGemmaSpec(BaseModel):
    """One variant: a model on one GPU profile with one set of serving settings and a cost."""

    model_config = _config(
        ("self.minReplicas <= self.maxReplicas", "minReplicas must not exceed maxReplicas"),
        (
            "self.replicas >= self.minReplicas && self.replicas <= self.maxReplicas",
            "replicas must lie between minReplicas and maxReplicas",
        ),
        ("self.runtime == 'external' || has(self.model)", "model is required unless runtime is external"),
        ("self.runtime != 'dgemma' || has(self.image)", "image is required for runtime dgemma"),
        ("self.runtime != 'external' || has(self.external)", "runtime external needs the external section"),
        ("!has(self.external) || self.runtime == 'external'", "the external section is for runtime external"),
        ("!has(self.vllm) || self.runtime == 'vllm'", "the vllm section is for runtime vllm"),
        ("self.runtime != 'external' || !self.autoscaling.enabled", "an external variant has no replicas to scale"),
        ("self.runtime == 'dgemma' || !has(self.worker.tlsSecret)", "worker.tlsSecret is for runtime dgemma"),
        ("self.runtime != 'external' || (!has(self.worker.apiKeySecret) && !has(self.worker.env))",
         "worker.apiKeySecret and worker.env are for runtimes that run pods (an external API's key is "
         "external.apiKeySecret)"),
        (
            "self.runtime != 'vllm' || ("
            + " && ".join(f"!has(self.generation.{name})" for name in VLLM_FIXED_SETTINGS) + ")",
            f"generation.{', '.join(VLLM_FIXED_SETTINGS)} cannot be set for runtime vllm: vLLM {vllm.VERSION} reads "
            "them from the checkpoint's generation_config.json",
        ),
    )
    served_model_name: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$")
    """Model name clients ask for (OpenAI `model`); several variants may serve the same name."""
    runtime: Runtime = Field(
        default=variants.DEFAULT_RUNTIME,
        json_schema_extra={"x-kubernetes-validations": [
            {"rule": "self == oldSelf", "message": "runtime is immutable: create another resource for another runtime"}
        ]},
    )
    """What serves the variant: dgemma workers, vLLM's OpenAI server, or an external OpenAI-compatible API
    (overflow only). Fixed at creation."""
    model: ModelSource | None = None
    """Where the weights come from (not for runtime external)."""
    image: str | None = Field(default=None, min_length=1, max_length=512)
    """Worker container image (runs `dgemma worker`); required for runtime dgemma."""
    vllm: VllmSpec | None = None
    """vLLM settings (runtime vllm); every field has a default."""
    external: ExternalSpec | None = None
    """The external API (runtime external)."""
    allow_overflow: bool = variants.DEFAULT_ALLOW_OVERFLOW
    """Let requests this variant cannot serve in time go to an external variant of the same model. Off by
    default: prompts leave the cluster only by choice."""
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    """Image pull policy."""
    cache: CacheSpec = Field(default_factory=CacheSpec, json_schema_extra=_object_default())
    """Model cache shared by the replicas."""
    gpu: GpuSpec = Field(default_factory=GpuSpec, json_schema_extra=_object_default())
    """GPU profile and overrides."""
    replicas: int = Field(default=variants.DEFAULT_REPLICAS, ge=0, le=1000)
    """Desired replicas (the scale subresource writes this)."""
    min_replicas: int = Field(default=variants.DEFAULT_MIN_REPLICAS, ge=0, le=1000)
    """Lower bound for scaling."""
    max_replicas: int = Field(default=4, ge=1, le=1000)
    """Upper bound for scaling."""
    cost_weight: float = Field(default=variants.DEFAULT_COST_WEIGHT, gt=0, le=1000)
    """Relative cost of one replica-second; the gateway prefers cheaper variants that meet the target."""
    latency_target_ms: int = Field(default=variants.DEFAULT_LATENCY_TARGET_MS, ge=1, le=600000)
    """Default end-to-end latency target for requests that carry none."""
    generation: GenerationDefaults = Field(
        default_factory=GenerationDefaults, json_schema_extra=_object_default()
    )
    """Generation defaults."""
    worker: WorkerSpec = Field(default_factory=WorkerSpec, json_schema_extra=_object_default())
    """Worker limits and lifecycle."""
    autoscaling: AutoscalingSpec = Field(default_factory=AutoscalingSpec, json_schema_extra=_object_default())
    """Autoscaling settings."""
    service_account_name: str | None = Field(default=None, max_length=253)
    """Service account of the worker pods."""


class Condition(BaseModel):
    """A standard condition (metav1.Condition)."""

    model_config = _config()
    type: str
    """Ready, Progressing or Degraded (the reconciler's), or ScalingActive (the autoscaler's)."""
    status: Literal["True", "False", "Unknown"]
    """Condition status."""
    reason: str = ""
    """Machine-readable CamelCase reason."""
    message: str = ""
    """Human-readable detail."""
    last_transition_time: str | None = None
    """When the status last changed."""
    observed_generation: int | None = None
    """The generation this condition was computed for."""


class Measured(BaseModel):
    """Measurements reported by the gateway/autoscaler."""

    model_config = _config()
    tokens_per_second: float | None = None
    """Tokens/s delivered across ready replicas."""
    latency_p95_ms: float | None = None
    """95th percentile end-to-end latency."""
    tokens_per_second_per_replica: float | None = None
    """Capacity of one replica at its latency target."""
    time: str | None = None
    """When measured."""


class ScalingDecision(BaseModel):
    """A scaling decision with its reasons."""

    model_config = _config()
    desired_replicas: int
    """Replicas decided."""
    reason: str = ""
    """Why."""
    inputs: dict[str, Any] | None = None
    """Measured inputs the decision used."""
    time: str | None = None
    """When decided."""


class Recommendation(BaseModel):
    """One past recommendation of the autoscaler."""

    model_config = _config()
    time: float
    """When (seconds since the epoch)."""
    replicas: int
    """Replicas recommended."""


class ScalerMemory(BaseModel):
    """What the autoscaler remembers between decisions, kept here so that an operator restart keeps it."""

    model_config = _config()
    recommendations: list[Recommendation] | None = None
    """Recommendations within the stabilization windows."""
    panic_until: float | None = None
    """No scale-down before this time (seconds since the epoch): targets were being missed."""
    last_demand_at: float | None = None
    """When demand was last seen (seconds since the epoch)."""
    first_seen: float | None = None
    """When the autoscaler first decided for this resource (seconds since the epoch)."""


class AutoscalingStatus(BaseModel):
    """What the autoscaler last did."""

    model_config = _config()
    last_decision: ScalingDecision | None = None
    """Last scaling decision."""
    memory: ScalerMemory | None = None
    """The decision function's state."""


class DiffusionGemmaStatus(BaseModel):
    """Observed state, written by the operator (and measurements by the autoscaler)."""

    model_config = _config()
    observed_generation: int | None = None
    """The spec generation the status describes."""
    conditions: list[Condition] | None = None
    """Ready, Progressing and Degraded; with autoscaling on, ScalingActive (False while the autoscaler has no valid
    measurements, with the reason: the replicas are then kept)."""
    replicas: int | None = None
    """Replicas that exist (the scale subresource reads this)."""
    ready_replicas: int | None = None
    """Replicas that pass their readiness probe."""
    updated_replicas: int | None = None
    """Replicas running the current spec."""
    selector: str | None = None
    """Label selector of the pods (for the scale subresource and HPA)."""
    endpoint: str | None = None
    """Where the gateway reaches the variant: the workers' gRPC Service (host:port), vLLM's HTTP API root, or
    the external API's."""
    tokens_per_second_prior: float | None = None
    """Expected tokens/s per replica from the GPU profile (until measured)."""
    measured: Measured | None = None
    """Measurements."""
    autoscaling: AutoscalingStatus | None = None
    """Autoscaler state."""


class DiffusionGemma(BaseModel):
    """A DiffusionGemma variant: served by dgemma workers, by vLLM, or by an external API taking overflow."""

    model_config = _config()
    spec: DiffusionGemmaSpec
    """Desired state."""
    status: DiffusionGemmaStatus | None = None
    """Observed state."""
