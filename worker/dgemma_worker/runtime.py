"""What the servicers stand on: the engine once it is loaded, and one way to run a request.

`WorkerRuntime.run` admits a request, yields its events, writes its one log line, and turns every
failure into `RequestFailed` carrying the status from `errors.py`, so both front ends (dgemma.v1 and
KServe v2) behave the same.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, replace
from typing import Protocol

from dgemma_common.logsafe import clip
from dgemma_common.params import GenerationParams, ParamError, params_from_mapping
from dgemma_common.types import (
    CommitEvent,
    Event,
    FinalEvent,
    LoadSnapshot,
    NotReadyError,
    Prompt,
)
from dgemma_worker.errors import DeadlineExceeded, RpcError, status_for_exception, status_for_final
from dgemma_worker.metrics import WorkerMetrics
from dgemma_worker.prompts import check_size
from dgemma_worker.request_trace import RequestSpans
from dgemma_worker.worker_config import WorkerConfig

log = logging.getLogger("dgemma_worker.requests")

TOKENIZE_CONCURRENCY = 2


class EngineAPI(Protocol):
    """The part of `dgemma_worker.engine.Engine` the server uses."""

    @property
    def ready(self) -> bool: ...
    @property
    def draining(self) -> bool: ...
    @property
    def alive(self) -> bool: ...
    @property
    def model_name(self) -> str: ...
    @property
    def model_revision(self) -> str: ...
    @property
    def canvas_length(self) -> int: ...
    @property
    def defaults(self) -> GenerationParams: ...

    def stream(
        self, prompt: Prompt, params: GenerationParams, *, deadline: float | None = None
    ) -> AsyncIterator[Event]: ...
    def load_snapshot(self) -> LoadSnapshot: ...
    def tokenize(self, prompt: Prompt, max_tokens: int | None = None) -> list[int]: ...
    def detokenize(self, ids: Sequence[int]) -> str: ...
    def drain(self) -> None: ...
    def wait_idle(self, timeout: float) -> bool: ...
    def shutdown(self) -> None: ...


class RequestFailed(Exception):
    """A request ended with an error status; `error` says which."""

    def __init__(self, error: RpcError) -> None:
        super().__init__(error.message)
        self.error = error


class WorkerRuntime:
    """Holds the engine (None until loaded) and runs requests on it."""

    def __init__(self, config: WorkerConfig, metrics: WorkerMetrics) -> None:
        self.config = config
        self.metrics = metrics
        self.engine: EngineAPI | None = None
        # Request defaults: the flags over the published settings until the model loads, then over its own.
        self.defaults = params_from_mapping(config.default_overrides, GenerationParams(), config.limits)
        self.stopping = asyncio.Event()  # set when load watchers should end (the server is stopping)
        # Tokenizing is CPU work on threads: a few at a time, so a burst of large prompts cannot starve the engine.
        self._tokenizing = asyncio.Semaphore(TOKENIZE_CONCURRENCY)
        self._draining = False

    @property
    def ready(self) -> bool:
        """Loaded, warmed up, and admitting."""
        return self.engine is not None and self.engine.ready and not self._draining and not self.engine.draining

    def begin_drain(self) -> None:
        """Refuse new requests from now on; in-flight ones continue."""
        self._draining = True
        if self.engine is not None:
            self.engine.drain()

    def require_engine(self) -> EngineAPI:
        """The engine, or NotReadyError while loading or draining."""
        if self.engine is None:
            raise NotReadyError("model is loading")
        if self._draining:
            raise NotReadyError("draining")
        return self.engine

    def load_snapshot(self) -> LoadSnapshot:
        """The engine's load, with the served model name; a not-ready placeholder before loading."""
        if self.engine is None:
            return LoadSnapshot(
                queue_depth=0,
                active=0,
                capacity=self.config.max_active,
                max_queue=self.config.max_queue,
                step_latency_s=0.0,
                tokens_per_s=0.0,
                encoder_latency_s=0.0,
                canvas_length=0,
                model_name=self.config.model_name,
                model_revision=self.config.model_revision or "",
                ready=False,
                draining=self._draining,
            )
        snap = self.engine.load_snapshot()
        return replace(
            snap,
            model_name=self.config.model_name,
            ready=snap.ready and not self._draining,
            draining=snap.draining or self._draining,
        )

    async def tokenize(self, engine: EngineAPI, prompt: Prompt) -> list[int]:
        """A prompt's token ids: refused by size first, then tokenized on a thread, never on the event loop."""
        limits = self.config.limits
        check_size(prompt, limits)
        async with self._tokenizing:
            return await asyncio.to_thread(engine.tokenize, prompt, limits.max_prompt_tokens)

    async def detokenize(self, engine: EngineAPI, ids: list[int]) -> str:
        """Text of token ids, bounded in count, decoded on a thread."""
        limits = self.config.limits
        most = limits.max_prompt_tokens + limits.max_new_tokens
        if len(ids) > most:
            raise ParamError("token_ids", f"at most {most} ids, got {len(ids)}")
        async with self._tokenizing:
            return await asyncio.to_thread(engine.detokenize, ids)

    def refuse(self, exc: BaseException, *, request_id: str, rpc: str) -> RpcError:
        """Map an error raised before a request reached the engine; count it and log its line."""
        error = status_for_exception(exc, request_id)
        self.metrics.on_refused(error.outcome)
        self._log_request(rpc, request_id, error.outcome, error, None, time.monotonic(), None, [])
        return error

    async def run(
        self,
        prompt: Prompt,
        params: GenerationParams,
        *,
        request_id: str,
        rpc: str,
        deadline: float | None = None,
    ) -> AsyncIterator[Event]:
        """Yield a request's drafts, commits and its final event; raise RequestFailed on any error.

        Closing the iterator (the client went away) cancels the engine request.
        """
        started = time.monotonic()
        final: FinalEvent | None = None
        error: RpcError | None = None
        outcome = "cancelled"
        committed: list[str] = []
        spans = RequestSpans()
        try:
            if deadline is not None and deadline <= started:
                raise DeadlineExceeded("deadline exceeded before the request started")
            engine = self.require_engine()
            ids = await self.tokenize(engine, prompt)
            # The engine gets the ids: nothing is tokenized on the event loop.
            events = engine.stream(Prompt.of_tokens(ids), params, deadline=deadline)
            try:
                async for event in events:
                    if isinstance(event, FinalEvent):
                        final = event
                        error = status_for_final(event, request_id)
                        if error is not None:
                            break
                        outcome = event.stop_reason.value
                    elif isinstance(event, CommitEvent) and self.config.log_prompts:
                        committed.append(event.text)
                    spans.saw(event)
                    yield event
            finally:
                # Closing the engine's stream is what cancels the engine request.
                aclose = getattr(events, "aclose", None)
                if aclose is not None:
                    await aclose()
        except (asyncio.CancelledError, GeneratorExit):
            outcome = "cancelled"
            raise
        except Exception as exc:
            error = status_for_exception(exc, request_id)
            self.metrics.on_refused(error.outcome)
        finally:
            if error is not None:
                outcome = error.outcome
            spans.end(final)
            self._log_request(rpc, request_id, outcome, error, final, started, prompt, committed)
        if error is not None:
            raise RequestFailed(error)

    def _log_request(
        self,
        rpc: str,
        request_id: str,
        outcome: str,
        error: RpcError | None,
        final: FinalEvent | None,
        started: float,
        prompt: Prompt | None,
        committed: list[str],
    ) -> None:
        fields: dict[str, object] = {
            "event": "request",
            "rpc": rpc,
            "request_id": clip(request_id),
            "outcome": outcome,
            "code": error.code.name if error else ("CANCELLED" if outcome == "cancelled" else "OK"),
            "wall_s": round(time.monotonic() - started, 6),
        }
        if final is not None:
            fields.update({k: v for k, v in asdict(final.stats).items() if v is not None})
            fields["tokens_per_forward"] = round(final.stats.tokens_per_forward, 4)
        if error is not None:
            fields["error"] = error.message
        if self.config.log_prompts and prompt is not None:
            fields["prompt"] = _prompt_text(prompt)
            fields["completion"] = "".join(committed)
        log.info("request %s %s", clip(request_id), outcome, extra={"fields": fields})


def _prompt_text(prompt: Prompt) -> object:
    if prompt.text is not None:
        return prompt.text
    if prompt.messages is not None:
        return [{"role": m.role, "content": m.text, **({"images": len(m.images)} if m.images else {})}
                for m in prompt.messages]
    return list(prompt.token_ids or ())


def monotonic_deadline(time_remaining: float | None, timeout_s: float = 0.0) -> float | None:
    """The earlier of the gRPC deadline (seconds remaining) and the request's own timeout."""
    now = time.monotonic()
    candidates = [now + t for t in (time_remaining, timeout_s if timeout_s > 0 else None) if t is not None]
    return min(candidates) if candidates else None
