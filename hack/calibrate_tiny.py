"""Calibrate the trained checkpoint's adaptive stopping on held-out prompts, and the quality measures for it.

    python hack/calibrate_tiny.py DIR          # writes DIR/generation_config.json and DIR/calibration.json

Adaptive stopping ends a canvas when its argmax draft has not changed for `stability_threshold` steps and
the canvas's mean entropy is below `confidence_threshold`. The published settings fit the 26B model, whose
per-position entropies are near zero: its entropy-bound sampler (accept the lowest-entropy positions while
their entropies sum to at most `entropy_bound`, 0.1 nats) takes many positions per step, and its canvases
converge early. A 3M-parameter model is far less sure: at 0.1 nats it accepts a position or two per step,
its argmax keeps changing until the last steps of the temperature schedule (41 of 48 on average), and no
stopping threshold can stop a canvas that has not converged. So the budget is the checkpoint's too:

1. For each candidate entropy bound, every held-out prompt is generated once at the step cap with stopping
   off, recording each step's argmax canvas and mean entropy (through the engine's own stopping rule,
   so the numbers are the engine's). With a fixed seed a stopping rule does not change the steps before it
   stops, so one trace per prompt shows where every candidate rule would stop and what it would commit.
2. Each candidate (entropy bound, stability, confidence) is scored on the traces: steps per canvas, and
   quality (see `quality`): agreement with what the same sampler commits after all 48 steps (has the
   canvas converged?), and the share of real words and the model's own next-token loss on the text
   against the published settings' full 48 steps (is the text as good?).
3. The fastest candidate within `TOLERANCE` of both is written to the checkpoint's generation_config; a
   last real run with it checks the traces predicted its steps.

The held-out prompts come from passages the model never trained on (hack/train_tiny.py's split).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from train_tiny import GENERIC, QUESTIONS, Recipe, corpus, is_heldout

import dgemma_worker.runner as runner_module
from dgemma_common.params import GenerationParams
from dgemma_common.types import ChatMessage, CommitEvent, FinalEvent, Prompt
from dgemma_worker.engine import Engine, EngineConfig
from dgemma_worker.model import LoadedModel, load_model

NEVER = 64  # a stability_threshold no canvas of <= 48 steps can meet: stopping off
ENTROPY_BOUNDS = (0.1, 0.3, 1.0, 3.0)  # 0.1: the published one
STABILITY = (1, 2, 3, 4)
CONFIDENCE = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1)
CAP = 48
PROMPTS = 64
SEED = 15


@dataclass(frozen=True)
class Tolerance:
    """How close to the references a calibrated canvas must stay (means over the prompts)."""

    agreement: float = 0.97  # of tokens with the same sampler's 48 steps, up to the end of the longer reply
    words: float = 0.02  # real-word share, absolute, below the published settings' 48 steps at most
    nll: float = 0.1  # nats per token, above the published settings' 48 steps at most


TOLERANCE = Tolerance()


# ---- prompts and words -------------------------------------------------------------------------


def heldout_prompts(count: int = PROMPTS, seed: int = SEED) -> list[Prompt]:
    """Chat questions about held-out passages, generic chat prompts, and raw starts of held-out text."""
    rng = random.Random(seed)
    heldout = [p for p in corpus() if is_heldout(p, Recipe().heldout_share)]
    out: list[Prompt] = []
    for i in range(count):
        passage = rng.choice(heldout)
        kind = i % 4
        if kind == 3:
            out.append(Prompt.of_text(" ".join(passage.text.split()[: rng.randint(2, 6)])))
        else:
            question = rng.choice(GENERIC) if kind == 2 else rng.choice(QUESTIONS).format(name=passage.name)
            out.append(Prompt.of_messages([ChatMessage(role="user", content=question)]))
    return out


def dictionary() -> frozenset[str]:
    """Every word of the training corpus, lower-cased: what counts as a real word."""
    return frozenset(w.lower() for p in corpus() for w in re.findall(r"[A-Za-z]+", p.text))


def word_share(text: str, words: frozenset[str]) -> float:
    """Share of the text's words that are real words (1.0 for an empty reply)."""
    found = re.findall(r"[A-Za-z]+", text)
    return sum(w.lower() in words for w in found) / len(found) if found else 1.0


@torch.no_grad()
def nll(loaded: LoadedModel, prompt_ids: Sequence[int], reply_ids: Sequence[int]) -> float:
    """Mean next-token loss of the reply under the model's causal encoder (its own judge of fluency)."""
    from transformers import DynamicCache

    model = loaded.model
    if not reply_ids:
        return 0.0
    ids = torch.tensor([[*prompt_ids, *reply_ids]], device=loaded.device)
    cache = DynamicCache(config=model.config.get_text_config())
    hidden = model.model.encoder(input_ids=ids, past_key_values=cache, use_cache=True).last_hidden_state
    cap = model.final_logit_softcapping
    logits = torch.tanh(model.lm_head(hidden[0, len(prompt_ids) - 1 : -1]).float() / cap) * cap
    return float(torch.nn.functional.cross_entropy(logits, ids[0, len(prompt_ids) :]))


# ---- traces ------------------------------------------------------------------------------------


class Recorder:
    """Records, at each step of the engine's stopping rule, the first row's argmax canvas and mean entropy,
    one list per canvas (the rule's step counter restarts at 0 with each canvas)."""

    def __init__(self) -> None:
        self.canvases: list[list[tuple[torch.Tensor, float]]] = []

    def wrap(self, rule: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def recorded(history: torch.Tensor, step: torch.Tensor, argmax: torch.Tensor, entropy: torch.Tensor,
                     *thresholds: torch.Tensor) -> torch.Tensor:
            if int(step) == 0 or not self.canvases:
                self.canvases.append([])
            self.canvases[-1].append((argmax[0].clone(), float(entropy[0].mean())))
            return rule(history, step, argmax, entropy, *thresholds)

        return recorded


@contextmanager
def recording() -> Iterator[Recorder]:
    """Let the engine's requests record their steps (one request of one canvas at a time): the step runner
    applies the stopping rule (`stop_rule`) to every row at every step."""
    recorder = Recorder()
    original = runner_module.stop_rule
    runner_module.stop_rule = recorder.wrap(original)
    try:
        yield recorder
    finally:
        runner_module.stop_rule = original


@dataclass(frozen=True)
class Output:
    """One finished request."""

    prompt_ids: tuple[int, ...]
    ids: tuple[int, ...]
    text: str
    canvases: int
    decoder_passes: int
    seconds: float


def generate(engine: Engine, prompt: Prompt, params: GenerationParams) -> Output:
    """Run one request to the end on a started engine."""
    ids: list[int] = []
    final = None
    for event in engine.generate(prompt, params):
        if isinstance(event, CommitEvent):
            ids.extend(event.token_ids)
        elif isinstance(event, FinalEvent):
            final = event
    assert final is not None and final.error is None, final
    return Output(tuple(engine.tokenize(prompt)), tuple(ids), engine.detokenize(ids), final.stats.canvases,
                  final.stats.decoder_passes, final.stats.total_s)


@dataclass(frozen=True)
class Trace:
    """One prompt's first canvas at the cap with stopping off: (argmax, mean entropy) at every step."""

    prompt_ids: tuple[int, ...]
    steps: list[tuple[torch.Tensor, float]]


def traces(engine: Engine, prompts: Sequence[Prompt], entropy_bound: float, cap: int = CAP) -> list[Trace]:
    """One canvas per prompt, every step recorded (seeded per prompt)."""
    out = []
    with recording() as recorder:
        for i, prompt in enumerate(prompts):
            params = replace(engine.defaults, max_new_tokens=engine.canvas_length, max_denoising_steps=cap,
                             entropy_bound=entropy_bound, stability_threshold=NEVER, seed=SEED + i)
            recorder.canvases = []
            generate(engine, prompt, params)
            steps = recorder.canvases[0]
            assert len(recorder.canvases) == 1 and len(steps) == cap, [len(c) for c in recorder.canvases]
            out.append(Trace(tuple(engine.tokenize(prompt)), steps))
    return out


def stop_step(trace: Trace, stability: int, confidence: float) -> int:
    """The step (1-based) at which the engine's rule stops this canvas, or the last step."""
    for s, (argmax, entropy) in enumerate(trace.steps, start=1):
        window = trace.steps[max(0, s - 1 - stability) : s - 1]
        stable = stability == 0 or (len(window) == stability and all(torch.equal(a, argmax) for a, _ in window))
        if stable and entropy < confidence:
            return s
    return len(trace.steps)


# ---- quality -----------------------------------------------------------------------------------


def cut_at_eos(ids: Sequence[int], eos: Sequence[int]) -> list[int]:
    """The reply a canvas gives: up to its first EOS."""
    out = []
    for t in ids:
        if t in eos:
            break
        out.append(t)
    return out


def agreement(ids: Sequence[int], reference: Sequence[int]) -> float:
    """Share of positions equal to the reference's, up to the end of the longer reply (EOS included)."""
    n = max(len(ids), len(reference)) + 1
    a, b = [*ids, -1][:n] + [-2] * (n - len(ids) - 1), [*reference, -1][:n] + [-3] * (n - len(reference) - 1)
    return sum(x == y for x, y in zip(a, b, strict=True)) / n


@dataclass(frozen=True)
class Quality:
    """Means over a set of replies."""

    agreement: float
    words: float
    nll: float

    def within(self, published: Quality, tolerance: Tolerance) -> bool:
        """Converged (agrees with its own sampler's full run) and as good as the published settings' full run."""
        return (self.agreement >= tolerance.agreement and self.words >= published.words - tolerance.words
                and self.nll <= published.nll + tolerance.nll)


def quality(loaded: LoadedModel, replies: Sequence[tuple[Sequence[int], Sequence[int]]],
            references: Sequence[Sequence[int]], words: frozenset[str]) -> Quality:
    """Agreement with the references, real-word share and the model's own loss, for (prompt, reply) pairs."""
    detok = loaded.tokenizer.decode
    n = len(replies)
    return Quality(
        agreement=sum(agreement(r, ref) for (_, r), ref in zip(replies, references, strict=True)) / n,
        words=sum(word_share(detok(list(r), skip_special_tokens=True), words) for _, r in replies) / n,
        nll=sum(nll(loaded, p, r) for p, r in replies) / n,
    )


# ---- calibration -------------------------------------------------------------------------------


def score(loaded: LoadedModel, runs: Sequence[Trace], entropy_bound: float, stability: int, confidence: float,
          words: frozenset[str]) -> dict[str, Any]:
    """Steps and quality of one stopping rule on the traces of one entropy bound."""
    eos = loaded.eos_token_ids
    stops = [stop_step(t, stability, confidence) for t in runs]
    replies = [(t.prompt_ids, cut_at_eos(t.steps[s - 1][0].tolist(), eos)) for t, s in zip(runs, stops, strict=True)]
    references = [cut_at_eos(t.steps[-1][0].tolist(), eos) for t in runs]
    q = quality(loaded, replies, references, words)
    return {"entropy_bound": entropy_bound, "stability_threshold": stability, "confidence_threshold": confidence,
            "steps_mean": sum(stops) / len(stops), "steps": stops, "quality": asdict(q)}


def calibrate(model_dir: Path, prompts: int = PROMPTS) -> dict[str, Any]:
    """Pick, write and check the checkpoint's stopping thresholds; return the record."""
    torch.set_num_threads(1)
    loaded = load_model(model_dir, dtype="float32")
    engine = Engine(loaded, EngineConfig(max_active=1, max_queue=0))
    engine.start(warmup=False)
    try:
        words = dictionary()
        full: list[dict[str, Any]] = []
        grid: list[dict[str, Any]] = []
        for bound in ENTROPY_BOUNDS:
            runs = traces(engine, heldout_prompts(prompts), bound)
            full.append(score(loaded, runs, bound, NEVER, 1.0, words))
            grid += [score(loaded, runs, bound, k, c, words) for k in STABILITY for c in CONFIDENCE]
        published = Quality(**full[0]["quality"])
        fit = [g for g in grid if Quality(**g["quality"]).within(published, TOLERANCE)]
        chosen = min(fit, key=lambda g: (g["steps_mean"], g["stability_threshold"], -g["confidence_threshold"]))
        write_settings(model_dir, chosen["entropy_bound"], chosen["stability_threshold"],
                       chosen["confidence_threshold"])
        check = check_run(model_dir, prompts, chosen)
    finally:
        engine.shutdown()
    return {"cap": CAP, "prompts": prompts, "tolerance": asdict(TOLERANCE), "full_48_steps": [_brief(f) for f in full],
            "chosen": _brief(chosen), "grid": [_brief(g) for g in grid], "check": check}


def _brief(entry: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in entry.items() if k != "steps"}


def write_settings(model_dir: Path, entropy_bound: float, stability: int, confidence: float) -> None:
    """Set them in the checkpoint's generation_config.json (strict types: a sampler config, an int, a float)."""
    from transformers.models.diffusion_gemma import DiffusionGemmaGenerationConfig
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import EntropyBoundSamplerConfig

    config: Any = DiffusionGemmaGenerationConfig.from_pretrained(model_dir)
    config.sampler_config = EntropyBoundSamplerConfig(entropy_bound=float(entropy_bound))
    config.stability_threshold = int(stability)
    config.confidence_threshold = float(confidence)
    config.save_pretrained(model_dir)


def check_run(model_dir: Path, prompts: int, chosen: dict[str, Any]) -> dict[str, Any]:
    """Run the engine with the written thresholds as its defaults: its steps must be the ones predicted."""
    loaded = load_model(model_dir, dtype="float32")
    engine = Engine(loaded, EngineConfig(max_active=1, max_queue=0))
    engine.start(warmup=False)
    try:
        steps = []
        for i, prompt in enumerate(heldout_prompts(prompts)):
            params = replace(engine.defaults, max_new_tokens=engine.canvas_length, seed=SEED + i)
            steps.append(generate(engine, prompt, params).decoder_passes)
    finally:
        engine.shutdown()
    return {"steps_mean": sum(steps) / len(steps), "matches_traces": steps == chosen["steps"],
            "defaults": {"entropy_bound": engine.defaults.entropy_bound,
                         "stability_threshold": engine.defaults.stability_threshold,
                         "confidence_threshold": engine.defaults.confidence_threshold}}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("dir", type=Path, help="the trained checkpoint (its generation_config is rewritten)")
    parser.add_argument("--prompts", type=int, default=PROMPTS)
    args = parser.parse_args(argv)
    record = calibrate(args.dir, args.prompts)
    (args.dir / "calibration.json").write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps({"full_48_steps": record["full_48_steps"], "chosen": record["chosen"],
                      "check": record["check"]}, indent=1))
    return 0 if record["check"]["matches_traces"] else 1


if __name__ == "__main__":
    sys.exit(main())

