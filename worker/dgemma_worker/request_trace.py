"""The spans of one request inside the worker, from the engine's own events and stats: the time it waited for
an active slot, then one span per canvas (encoder pass + denoising steps, ending at the canvas's commit), each
with its encoder pass as a child.

The engine times the encoder per batched pass (`RequestStats.encoder_s` sums those of a request's passes); a
canvas's encoder span is the mean pass of the request, placed at the canvas's start. The spans are made after
the fact with their measured times, so the engine loop does no tracing work.
"""

from __future__ import annotations

import time

from opentelemetry import trace

from dgemma_common.types import CommitEvent, Event, FinalEvent

_tracer = trace.get_tracer("dgemma_worker")


class RequestSpans:
    """Collects a request's commit times as its events pass; `end` writes the spans under the current span."""

    def __init__(self) -> None:
        self.parent = trace.get_current_span()
        self.started_ns = time.time_ns()
        self.commits_ns: list[tuple[int, int]] = []  # (canvas index, when its commit reached the runtime)

    def saw(self, event: Event) -> None:
        """Note an event of the request."""
        if isinstance(event, CommitEvent):
            self.commits_ns.append((event.canvas_index, time.time_ns()))

    def end(self, final: FinalEvent | None) -> None:
        """Write the queue-wait, canvas and encoder spans (nothing when tracing is off)."""
        if not self.parent.is_recording():
            return
        parent = trace.set_span_in_context(self.parent)
        queue_end = self.started_ns + int((final.stats.queue_wait_s if final else 0.0) * 1e9)
        _tracer.start_span("queue wait", context=parent, start_time=self.started_ns).end(end_time=queue_end)
        stats = final.stats if final else None
        encoder_ns = int(stats.encoder_s / stats.encoder_passes * 1e9) if stats and stats.encoder_passes else 0
        begin = queue_end
        for index, committed_ns in self.commits_ns:
            canvas = _tracer.start_span("canvas", context=parent, start_time=begin,
                                        attributes={"dgemma.canvas_index": index})
            if encoder_ns:
                inside = trace.set_span_in_context(canvas)
                _tracer.start_span("encoder pass", context=inside, start_time=begin).end(
                    end_time=min(committed_ns, begin + encoder_ns))
            canvas.end(end_time=committed_ns)
            begin = committed_ns
        if stats is not None:
            self.parent.set_attributes({
                "dgemma.stop_reason": final.stop_reason.value if final else "",
                "dgemma.canvases": stats.canvases, "dgemma.decoder_passes": stats.decoder_passes,
                "dgemma.completion_tokens": stats.completion_tokens, "dgemma.queue_wait_s": stats.queue_wait_s,
            })
