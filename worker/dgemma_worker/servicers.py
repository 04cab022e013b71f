"""The gRPC servicers: protobuf in, engine types across, protobuf out. No decisions live here.

`DenoiserServicer` serves dgemma.v1.Denoiser; `KServeServicer` serves the KServe v2 / Triton
`inference.GRPCInferenceService` from tritonclient's stubs. Both run requests through
`WorkerRuntime.run` and report errors through `errors.py`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator
from typing import Any, NoReturn

import grpc
from tritonclient.grpc import service_pb2 as kpb
from tritonclient.grpc import service_pb2_grpc as kpb_grpc

from dgemma_common import convert, kserve
from dgemma_common.params import ParamError
from dgemma_common.tracing import current_or_new_request_id
from dgemma_common.types import CommitEvent, FinalEvent
from dgemma_proto.dgemma.v1 import denoiser_pb2 as pb
from dgemma_proto.dgemma.v1 import denoiser_pb2_grpc as pb_grpc
from dgemma_worker.errors import RpcError, UnknownModelError, status_for_exception
from dgemma_worker.runtime import RequestFailed, WorkerRuntime, monotonic_deadline

log = logging.getLogger(__name__)

MIN_WATCH_INTERVAL_S = 0.05
MAX_WATCH_INTERVAL_S = 60.0


async def _abort(context: grpc.aio.ServicerContext[Any, Any], error: RpcError) -> NoReturn:
    await context.abort(error.code, error.message)
    raise AssertionError("unreachable: abort raises")  # pragma: no cover


class DenoiserServicer(pb_grpc.DenoiserServicer):
    """dgemma.v1.Denoiser."""

    def __init__(self, runtime: WorkerRuntime) -> None:
        self._rt = runtime

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.GenerateResponse]:
        """Stream one request's events."""
        rid = request.request_id or current_or_new_request_id()
        cfg = self._rt.config
        try:
            convert.check_request_id(rid)
            prompt = convert.prompt_from_pb(request.prompt, cfg.limits)
            params = convert.params_from_pb(request.params, self._rt.defaults, cfg.limits)
            if not (math.isfinite(request.timeout_s) and request.timeout_s >= 0):
                raise ParamError("timeout_s", f"must be a finite number of seconds >= 0, got {request.timeout_s}")
        except Exception as exc:
            await _abort(context, self._rt.refuse(exc, request_id=rid, rpc="Generate"))
        deadline = monotonic_deadline(context.time_remaining(), request.timeout_s)
        try:
            async for event in self._rt.run(prompt, params, request_id=rid, rpc="Generate", deadline=deadline):
                yield convert.event_to_pb(rid, event)
        except RequestFailed as failed:
            await _abort(context, failed.error)

    async def GetLoad(
        self, request: pb.GetLoadRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.LoadReport:
        """The load right now."""
        return convert.load_to_pb(self._rt.load_snapshot(), self._rt.config.limits, time.time())

    async def WatchLoad(
        self, request: pb.WatchLoadRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.LoadReport]:
        """A load report now, then one per interval until the client leaves or the worker stops."""
        if not math.isfinite(request.interval_s):  # NaN would slip through the clamp below and stream unthrottled
            await _abort(context, RpcError(grpc.StatusCode.INVALID_ARGUMENT,
                                           f"interval_s: must be a finite number of seconds, got {request.interval_s}",
                                           "invalid"))
        interval = request.interval_s or 1.0
        interval = min(max(interval, MIN_WATCH_INTERVAL_S), MAX_WATCH_INTERVAL_S)
        while True:
            yield convert.load_to_pb(self._rt.load_snapshot(), self._rt.config.limits, time.time())
            try:
                async with asyncio.timeout(interval):  # not wait_for: on 3.11 it can swallow a cancellation
                    await self._rt.stopping.wait()
            except TimeoutError:
                continue
            # The worker is stopping: one last report (draining) so subscribers see it, then end.
            yield convert.load_to_pb(self._rt.load_snapshot(), self._rt.config.limits, time.time())
            return

    async def Tokenize(
        self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.TokenizeResponse:
        """Token ids of a prompt as Generate would see it."""
        try:
            prompt = convert.prompt_from_pb(request.prompt, self._rt.config.limits)
            ids = await self._rt.tokenize(self._rt.require_engine(), prompt)
        except Exception as exc:
            await _abort(context, status_for_exception(exc))
        return pb.TokenizeResponse(token_ids=ids)

    async def Detokenize(
        self, request: pb.DetokenizeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.DetokenizeResponse:
        """Text of token ids (special tokens skipped)."""
        try:
            limits = self._rt.config.limits
            ids = convert.token_ids_from_pb(request.token_ids, limit=limits.max_prompt_tokens + limits.max_new_tokens)
            text = await self._rt.detokenize(self._rt.require_engine(), ids)
        except Exception as exc:
            await _abort(context, status_for_exception(exc))
        return pb.DetokenizeResponse(text=text)


class KServeServicer(kpb_grpc.GRPCInferenceServiceServicer):
    """KServe v2 / Triton inference.GRPCInferenceService for the one served model."""

    def __init__(self, runtime: WorkerRuntime, version: str) -> None:
        self._rt = runtime
        self._version = version

    @property
    def _model(self) -> str:
        return self._rt.config.model_name

    def _check_model(self, name: str, version: str = "") -> None:
        if name != self._model or version not in ("", "1"):
            raise UnknownModelError(name, version, self._model)

    async def ServerLive(self, request: Any, context: Any) -> kpb.ServerLiveResponse:
        """The process is up (even while loading)."""
        return kpb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> kpb.ServerReadyResponse:
        """Loaded, warm and not draining."""
        return kpb.ServerReadyResponse(ready=self._rt.ready)

    async def ModelReady(
        self, request: kpb.ModelReadyRequest, context: Any
    ) -> kpb.ModelReadyResponse:
        """The served model is ready; any other name is not."""
        known = request.name == self._model and request.version in ("", "1")
        return kpb.ModelReadyResponse(ready=known and self._rt.ready)

    async def ServerMetadata(self, request: Any, context: Any) -> kpb.ServerMetadataResponse:
        """Name and version of the worker."""
        return kpb.ServerMetadataResponse(name="dgemma-worker", version=self._version, extensions=[])

    async def ModelMetadata(
        self, request: kpb.ModelMetadataRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> kpb.ModelMetadataResponse:
        """The served model's tensors."""
        try:
            self._check_model(request.name, request.version)
        except Exception as exc:
            await _abort(context, status_for_exception(exc))
        return kserve.model_metadata(self._model)

    async def ModelConfig(
        self, request: kpb.ModelConfigRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> kpb.ModelConfigResponse:
        """The served model's Triton-style config (decoupled)."""
        try:
            self._check_model(request.name, request.version)
        except Exception as exc:
            await _abort(context, status_for_exception(exc))
        return kserve.model_config(self._model, self._rt.config.max_active)

    async def ModelInfer(
        self, request: kpb.ModelInferRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> kpb.ModelInferResponse:
        """Generate the whole reply and answer once."""
        try:
            self._check_model(request.model_name, request.model_version)
            req = await kserve.decode_off_the_loop(
                request, lambda: kserve.request_from_infer(request, self._rt.defaults, self._rt.config.limits))
        except Exception as exc:
            await _abort(context, self._rt.refuse(exc, request_id=request.id, rpc="ModelInfer"))
        commits: list[CommitEvent] = []
        final: FinalEvent | None = None
        deadline = monotonic_deadline(context.time_remaining())
        try:
            async for event in self._rt.run(
                req.prompt, req.params, request_id=req.request_id or current_or_new_request_id(), rpc="ModelInfer",
                deadline=deadline,
            ):
                if isinstance(event, CommitEvent):
                    commits.append(event)
                elif isinstance(event, FinalEvent):
                    final = event
        except RequestFailed as failed:
            await _abort(context, failed.error)
        assert final is not None
        return kserve.complete_response(self._model, req, commits, final)

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[kpb.ModelInferRequest], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[kpb.ModelStreamInferResponse]:
        """Decoupled streaming: per request, one response per commit, then a final one (or an error)."""
        async for response in kserve.decoupled_stream(request_iterator, self._stream_one):
            yield response

    async def _stream_one(
        self, request: kpb.ModelInferRequest, out: asyncio.Queue[kpb.ModelStreamInferResponse | None]
    ) -> None:
        try:
            self._check_model(request.model_name, request.model_version)
            req = await kserve.decode_off_the_loop(
                request, lambda: kserve.request_from_infer(request, self._rt.defaults, self._rt.config.limits))
        except Exception as exc:
            error = self._rt.refuse(exc, request_id=request.id, rpc="ModelStreamInfer")
            await out.put(kpb.ModelStreamInferResponse(error_message=error.message))
            return
        try:
            async for event in self._rt.run(
                req.prompt, req.params, request_id=req.request_id or current_or_new_request_id(), rpc="ModelStreamInfer"
            ):
                if isinstance(event, CommitEvent):
                    response = kserve.commit_response(self._model, req, event)
                elif isinstance(event, FinalEvent):
                    response = kserve.final_stream_response(self._model, req, event)
                else:
                    continue
                await out.put(kpb.ModelStreamInferResponse(infer_response=response))
        except RequestFailed as failed:
            await out.put(kpb.ModelStreamInferResponse(error_message=failed.error.message))
