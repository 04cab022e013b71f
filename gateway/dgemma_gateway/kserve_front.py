"""The KServe v2 / Triton GRPCInferenceService on the gateway (:8001), from tritonclient's stubs.

A `tritonclient.grpc` user points at the gateway instead of one worker: requests are decoded with the
worker's own KServe conversions (`dgemma_common.kserve`), routed like any other request, and answered
in the same tensors. Only settings the client gave are forwarded, so each variant's defaults apply.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator
from dataclasses import replace
from importlib import metadata
from typing import Any, NoReturn

import grpc
from tritonclient.grpc import service_pb2 as kpb
from tritonclient.grpc import service_pb2_grpc as kpb_grpc

from dgemma_common import kserve
from dgemma_common.auth import ApiKeys, AuthError, metadata_getter
from dgemma_common.convert import prompt_to_pb
from dgemma_common.guard import RequestGuard
from dgemma_common.kserve import parameter_value
from dgemma_common.openai_models import latency_target_ms
from dgemma_common.params import GenerationParams, Limits, ParamError
from dgemma_common.tracing import RequestContextInterceptor
from dgemma_common.types import CommitEvent, FinalEvent, RequestStats, StopReason
from dgemma_gateway.core import Gateway, GatewayRequest, estimate_text_tokens
from dgemma_gateway.endpoints import MAX_MESSAGE_BYTES
from dgemma_gateway.errors import GatewayError
from dgemma_gateway.images import ImageIntake, image_tokens
from dgemma_proto.dgemma.v1 import denoiser_pb2 as pb

log = logging.getLogger(__name__)

_STOP = {pb.STOP_REASON_EOS: StopReason.EOS, pb.STOP_REASON_STOP_STRING: StopReason.STOP_STRING,
         pb.STOP_REASON_LENGTH: StopReason.LENGTH}


def _final_event(final: pb.Final) -> FinalEvent:
    s = final.stats
    stats = RequestStats(
        prompt_tokens=s.prompt_tokens, completion_tokens=s.completion_tokens, canvases=s.canvases,
        decoder_passes=s.decoder_passes, encoder_passes=s.encoder_passes, queue_wait_s=s.queue_wait_s,
        time_to_first_commit_s=s.time_to_first_commit_s if s.HasField("time_to_first_commit_s") else None,
        total_s=s.total_s,
    )
    return FinalEvent(_STOP.get(final.stop_reason, StopReason.EOS), stats)


async def _abort(context: grpc.aio.ServicerContext[Any, Any], error: GatewayError) -> NoReturn:
    await context.abort(error.grpc_code, error.message)
    raise AssertionError("unreachable: abort raises")  # pragma: no cover


class GatewayKServeServicer(kpb_grpc.GRPCInferenceServiceServicer):
    """inference.GRPCInferenceService in front of every model the gateway serves."""

    def __init__(self, gateway: Gateway, max_tokens: int = 8192, default_max_tokens: int = 256,
                 keys: ApiKeys | None = None, images: ImageIntake | None = None,
                 prompt_bytes: int | None = None) -> None:
        self.gateway = gateway
        self.keys = keys
        self.images = images or ImageIntake()
        # `text_input` over `prompt_bytes` is refused by its length, before it is decoded or sent on.
        self.limits = Limits(max_new_tokens=max_tokens, max_prompt_bytes=prompt_bytes)
        self.default_max_tokens = default_max_tokens
        try:
            self.version = metadata.version("dgemma")
        except metadata.PackageNotFoundError:  # pragma: no cover
            self.version = "0+unknown"

    def _check_model(self, name: str, version: str = "") -> None:
        if name not in self.gateway.models() or version not in ("", "1"):
            raise GatewayError(404, f"unknown model {name!r}; served: {self.gateway.models()}", param="model")

    async def _prepared(self, request: kpb.ModelInferRequest, allow_overflow: bool = True
                        ) -> tuple[GatewayRequest, kserve.InferRequest]:
        """The decoded request with its images checked and its prompt length known to routing."""
        greq, decoded = await kserve.decode_off_the_loop(request, lambda: self._request(request, allow_overflow))
        images = decoded.prompt.all_images
        extra = 0
        if images:
            fields = [f"{kserve.IMAGE}[{k}]" for k in range(len(images))]
            known, spec = self.gateway.model_vision(greq.model)
            if known and spec is None:
                raise GatewayError(400, f"{kserve.IMAGE}: the model {greq.model!r} takes no images",
                                   param=kserve.IMAGE)
            infos = await self.images.check([(i.data, i.mime_type) for i in images], fields, kserve.IMAGE)
            extra = 0 if spec is None else image_tokens(infos, fields, spec)
        return replace(greq, prompt_tokens=estimate_text_tokens(greq.prompt) + extra), decoded

    def _allows_overflow(self, context: grpc.aio.ServicerContext[Any, Any]) -> bool:
        """Whether the caller's key lets its requests go to an external API (the guard has checked the key)."""
        if self.keys is None or not self.keys.enabled:
            return True
        try:
            key = self.keys.check(metadata_getter(context.invocation_metadata()))
        except AuthError:
            return False
        return self.keys.allows_overflow(key)

    def _request(self, request: kpb.ModelInferRequest, allow_overflow: bool = True
                 ) -> tuple[GatewayRequest, kserve.InferRequest]:
        self._check_model(request.model_name, request.model_version)
        try:
            target = None
            if kserve.LATENCY_TARGET in request.parameters:  # a routing hint (kserve skips it as a setting)
                target = latency_target_ms(parameter_value(request.parameters[kserve.LATENCY_TARGET]))
            decoded = kserve.request_from_infer(request, GenerationParams(), self.limits)
        except ParamError as exc:
            raise GatewayError(400, str(exc), param=exc.field) from None
        keep = {k: v for k, v in decoded.settings.items() if v is not None}
        keep.setdefault("max_new_tokens", self.default_max_tokens)
        return GatewayRequest(
            model=request.model_name, prompt=prompt_to_pb(decoded.prompt), settings=keep,
            latency_target_ms=target, api="kserve",
            allow_overflow=allow_overflow, **({"request_id": request.id} if request.id else {}),
        ), decoded

    async def ServerLive(self, request: Any, context: Any) -> kpb.ServerLiveResponse:
        """The gateway process is up."""
        return kpb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> kpb.ServerReadyResponse:
        """Some endpoint is ready."""
        return kpb.ServerReadyResponse(ready=self.gateway.ready_count() > 0)

    async def ModelReady(self, request: kpb.ModelReadyRequest, context: Any) -> kpb.ModelReadyResponse:
        """Some endpoint of this model is ready."""
        known = request.name in self.gateway.models() and request.version in ("", "1")
        return kpb.ModelReadyResponse(ready=known and self.gateway.ready_count(request.name) > 0)

    async def ServerMetadata(self, request: Any, context: Any) -> kpb.ServerMetadataResponse:
        """Name and version."""
        return kpb.ServerMetadataResponse(name="dgemma-gateway", version=self.version, extensions=[])

    async def ModelMetadata(self, request: kpb.ModelMetadataRequest,
                            context: grpc.aio.ServicerContext[Any, Any]) -> kpb.ModelMetadataResponse:
        """The model's tensors (the same for every variant)."""
        try:
            self._check_model(request.name, request.version)
        except GatewayError as err:
            await _abort(context, err)
        return kserve.model_metadata(request.name)

    async def ModelConfig(self, request: kpb.ModelConfigRequest,
                          context: grpc.aio.ServicerContext[Any, Any]) -> kpb.ModelConfigResponse:
        """A decoupled model config."""
        try:
            self._check_model(request.name, request.version)
        except GatewayError as err:
            await _abort(context, err)
        return kserve.model_config(request.name, max(1, self.gateway.ready_count(request.name)))

    async def _events(self, greq: GatewayRequest) -> AsyncIterator[tuple[str, Any]]:
        async with contextlib.aclosing(self.gateway.generate(greq)) as events:
            async for e in events:
                which = e.WhichOneof("event")
                if which == "commit":
                    yield "commit", CommitEvent(e.commit.canvas_index, tuple(e.commit.token_ids), e.commit.text)
                elif which == "final":
                    yield "final", _final_event(e.final)

    async def ModelInfer(self, request: kpb.ModelInferRequest,
                         context: grpc.aio.ServicerContext[Any, Any]) -> kpb.ModelInferResponse:
        """The whole reply at once."""
        try:
            greq, decoded = await self._prepared(request, self._allows_overflow(context))
            commits: list[CommitEvent] = []
            final: FinalEvent | None = None
            async for kind, event in self._events(greq):
                if kind == "commit":
                    commits.append(event)
                else:
                    final = event
        except GatewayError as err:
            await _abort(context, err)
        assert final is not None
        return kserve.complete_response(request.model_name, decoded, commits, final)

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[kpb.ModelInferRequest], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[kpb.ModelStreamInferResponse]:
        """Decoupled streaming: per request, one response per canvas, then a final one (or an error)."""
        one = functools.partial(self._stream_one, allow_overflow=self._allows_overflow(context))
        async for response in kserve.decoupled_stream(request_iterator, one):
            yield response

    async def _stream_one(self, request: kpb.ModelInferRequest,
                          out: asyncio.Queue[kpb.ModelStreamInferResponse | None], allow_overflow: bool = True
                          ) -> None:
        try:
            greq, decoded = await self._prepared(request, allow_overflow)
            async for kind, event in self._events(greq):
                if kind == "commit":
                    response = kserve.commit_response(request.model_name, decoded, event)
                else:
                    response = kserve.final_stream_response(request.model_name, decoded, event)
                await out.put(kpb.ModelStreamInferResponse(infer_response=response))
        except GatewayError as err:
            await out.put(kpb.ModelStreamInferResponse(error_message=err.message))


KSERVE_SERVICE = kpb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


async def start_grpc(gateway: Gateway, host: str, port: int, keys: ApiKeys, max_tokens: int = 8192,
                     default_max_tokens: int = 256, credentials: grpc.ServerCredentials | None = None,
                     images: ImageIntake | None = None, prompt_bytes: int | None = None
                     ) -> tuple[grpc.aio.Server, int]:
    """Start the KServe front (API keys on the inference service; health and reflection open; over TLS with
    credentials)."""
    from grpc_health.v1 import health, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection

    def refused(_service: str, reason: str) -> None:
        gateway.metrics.auth_failures.labels("kserve", reason).inc()

    guard = RequestGuard(keys, protected=(KSERVE_SERVICE,), on_refused=refused)
    traced = RequestContextInterceptor("dgemma_gateway", (f"/{KSERVE_SERVICE}/ModelInfer",
                                                          f"/{KSERVE_SERVICE}/ModelStreamInfer"))
    # Requests carry images: the same message bound as the gateway's channels to the workers.
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0),
                                      ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)],
                             interceptors=[guard, traced])
    kpb_grpc.add_GRPCInferenceServiceServicer_to_server(
        GatewayKServeServicer(gateway, max_tokens, default_max_tokens, keys, images, prompt_bytes), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    service_name = KSERVE_SERVICE
    reflection.enable_server_reflection((service_name, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = f"{host}:{port}"
    bound = server.add_insecure_port(address) if credentials is None else server.add_secure_port(address, credentials)
    if bound == 0:
        raise OSError(f"cannot bind {host}:{port}")
    await server.start()
    return server, bound
