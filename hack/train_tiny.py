"""Train the small DiffusionGemma that ships with dgemma, deterministically, on a CPU.

    nice -n 19 python hack/train_tiny.py --out /tmp/dgemma-tiny        # 81 min here (one thread, shared cores)
    python hack/calibrate_tiny.py /tmp/dgemma-tiny                      # then its sampling settings
    python hack/train_tiny.py --out /tmp/try --steps 200                # a quick look at the recipe

Model: transformers' own `DiffusionGemmaForBlockDiffusion` (the real checkpoint's class and config class),
scaled down (`SPEC`), with a tiny random vision tower (the class always builds one; this model never sees an
image). Tokenizer: a byte-level BPE trained with `tokenizers` on the training text, with Gemma's special
tokens and chat template (`dgemma_worker.model`).

Corpus (PSF License 2.0, like CPython itself): CPython's `pydoc_data.topics` (the language reference
topics `help()` shows) and the paragraphs of the standard library's docstrings, read with `ast`
(nothing is imported), kept when they are plain English prose. Debian's `fortunes` was considered and
left out: its quotations carry no clear licence.

Objective, following NeMo AutoModel's DiffusionGemma SFT recipe (`DiffusionGemmaSFTRecipe`, its guide
`docs/guides/dllm/diffusiongemma.md` in NVIDIA-NeMo/Automodel) and transformers' generation code:
- the response is cut into canvases aligned to its start, the last filled with EOS after the response ends
  (the fill is supervised: the model learns to stop); each canvas is a target whose context is the clean
  prompt and the clean canvases before it (one encoder pass over the whole sequence serves them all, with a
  block mask: `Batch`, `--check-mask`);
- corruption level t ~ U(eps, 1) per canvas; each position is replaced, with probability t, by a
  uniformly random token of the whole vocabulary (no [MASK] token: generation starts from uniform noise);
- flat cross-entropy over every canvas position (corrupted or not), no 1/t weighting;
- plus the encoder's causal next-token loss on the clean sequence (the shared weights run in both modes);
- self-conditioning: a first decoder pass without gradients; its logits feed the second pass for half of
  the examples (`self_conditioning_mask`), zeros for the rest, as generation's first step sees.

Determinism: fixed seeds (Python, torch), a fixed torch thread count (`THREADS`), fixed data order; the
same Python (the corpus comes from its standard library), torch and transformers versions give the same
checkpoint bit for bit. `training.json` in the output records all of it with the losses.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import random
import re
import sys
import sysconfig
import time
from collections.abc import Iterator, Sequence
from copy import deepcopy
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dgemma_worker.model import (
    BOS_ID,
    END_OF_TURN,
    EOS_ID,
    PAD_ID,
    SPECIAL_TOKENS,
    TinyModelSpec,
    bpe_tokenizer,
    fast_tokenizer,
    tiny_config,
)

THREADS = 1  # 2 threads on 2 shared cores thrash (OpenMP barriers): 4x slower per step, measured
SEED = 15

# ~2.8M parameters: hidden 192, 4 layers, dense MLP and a 4-expert MoE (top 2) side by side, canvas 32.
SPEC = TinyModelSpec(
    hidden_size=192,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=48,
    intermediate_size=384,
    num_experts=4,
    top_k_experts=2,
    moe_intermediate_size=96,
    canvas_length=32,
    bpe_vocab_size=2048,
    sliding_window=512,
)


@dataclass(frozen=True)
class Recipe:
    """Every knob of a training run (recorded in training.json)."""

    steps: int = 1600
    batch_size: int = 12  # sequences; each gives every canvas of its response (~2.5 on average)
    lr: float = 2e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    noise_eps: float = 1e-3
    self_conditioning_p: float = 0.5
    encoder_loss_weight: float = 0.5
    max_response_canvases: int = 3
    chat_share: float = 0.75  # the rest are raw text continuations (`dgemma generate --raw`)
    heldout_share: float = 0.03
    seed: int = SEED
    threads: int = THREADS
    spec: TinyModelSpec = field(default_factory=lambda: SPEC)


# ---- corpus ------------------------------------------------------------------------------------

_PROSE = re.compile(r"[A-Za-z0-9 ,.;:'\"()\-!?_/+=%\[\]]+")
_QUOTES = str.maketrans({"\u201c": '"', "\u201d": '"', "\u2018": "'", "\u2019": "'"})
_SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "turtledemo", "tkinter",
              "ensurepip", "__pycache__"}


@dataclass(frozen=True)
class Passage:
    """One stretch of prose and the name it documents (a topic or a qualified Python name)."""

    name: str
    text: str


def _prose(paragraph: str) -> str | None:
    """A paragraph as one line when it reads as English prose, else None (code, tables, grammar)."""
    text = re.sub(r"\[\d+\]", "", paragraph.translate(_QUOTES)).replace("*", "")
    text = " ".join(text.split())
    if len(text) < 40 or not _PROSE.fullmatch(text) or not text[0].isupper() or not text.endswith((".", ":")):
        return None
    words = text.split()
    if sum(w.strip(".,;:()\"'!?").isalpha() for w in words) < 0.75 * len(words):
        return None
    return text


def _topic_passages() -> list[Passage]:
    import pydoc_data.topics

    out = []
    for name in sorted(pydoc_data.topics.topics):
        for para in re.split(r"\n\s*\n", pydoc_data.topics.topics[name]):
            text = _prose(para)
            if text:
                out.append(Passage(name.replace("-", " "), text))
    return out


def _docstring_passages() -> list[Passage]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib)
        if _SKIP_DIRS & set(rel.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        module = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
        for node in ast.walk(tree):
            if not isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            doc = ast.get_docstring(node)
            if not doc or (not isinstance(node, ast.Module) and node.name.startswith("_")):
                continue
            name = module if isinstance(node, ast.Module) else f"{module}.{node.name}"
            for para in re.split(r"\n\s*\n", doc):
                text = _prose(para)
                if text:
                    out.append(Passage(name, text))
    return out


def corpus() -> list[Passage]:
    """Every passage, deduplicated, in a fixed order."""
    seen: set[str] = set()
    out = []
    for p in [*_topic_passages(), *_docstring_passages()]:
        if p.text not in seen:
            seen.add(p.text)
            out.append(p)
    return out


def is_heldout(p: Passage, share: float) -> bool:
    """A stable split: a passage is held out by the hash of its text."""
    h = int.from_bytes(hashlib.sha256(p.text.encode()).digest()[:8], "little")
    return h / 2**64 < share


# ---- examples ----------------------------------------------------------------------------------

QUESTIONS = (
    "What is {name}?",
    "Explain {name}.",
    "Tell me about {name}.",
    "How does {name} work?",
    "Describe {name} in one sentence.",
    "What does {name} do?",
)
GENERIC = (
    "Say hello in one sentence.",
    "Tell me something about Python.",
    "Write a sentence.",
    "Hello!",
    "What can you tell me?",
    "Explain something.",
)


@dataclass(frozen=True)
class Example:
    """One training sequence: the prompt, then the response cut into whole canvases (EOS-filled)."""

    tokens: list[int]
    prompt_length: int

    def canvases(self, length: int) -> int:
        return (len(self.tokens) - self.prompt_length) // length


class Examples:
    """Draws examples from passages: a chat turn or raw text continuing a few of its words."""

    def __init__(self, passages: Sequence[Passage], tokenizer: Any, recipe: Recipe, rng: random.Random) -> None:
        self.passages = list(passages)
        self.tok = tokenizer
        self.recipe = recipe
        self.rng = rng
        self.canvas = recipe.spec.canvas_length
        self.eot = SPECIAL_TOKENS.index(END_OF_TURN)

    def _ids(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def _response(self, first: int) -> str:
        """The passage, joined with the ones after it of the same name while they fit."""
        budget = self.canvas * self.recipe.max_response_canvases * 4  # ~4 characters a token
        text = self.passages[first].text
        i = first + 1
        while i < len(self.passages) and self.passages[i].name == self.passages[first].name:
            if len(text) + len(self.passages[i].text) > budget or self.rng.random() < 0.5:
                break
            text += " " + self.passages[i].text
            i += 1
        return text

    def draw(self) -> Example:
        i = self.rng.randrange(len(self.passages))
        passage = self.passages[i]
        body = self._ids(self._response(i))[: self.canvas * self.recipe.max_response_canvases - 1]
        if self.rng.random() < self.recipe.chat_share:
            template = self.rng.choice(GENERIC if self.rng.random() < 0.2 else QUESTIONS)
            messages = [{"role": "user", "content": template.format(name=passage.name)}]
            prompt = list(self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                       return_dict=False))
            response = [*body, self.eot]
        else:
            # Raw text: a few words of the passage as the prompt, the rest as the response.
            cut = self.rng.randint(1, min(12, max(1, len(body) - 1)))
            prompt, response = [BOS_ID, *body[:cut]], [*body[cut:], EOS_ID]
        # Whole canvases: the rest of the last one is EOS, as generation commits it (and cuts at the first).
        response += [EOS_ID] * (-len(response) % self.canvas)
        return Example(tokens=prompt + response, prompt_length=len(prompt))


@dataclass
class Batch:
    """Whole sequences for the encoder, every response canvas for the decoder, and who sees what.

    Each canvas attends to the clean prompt and the clean canvases before it (in the encoder's cache) and
    to itself, never to its own clean tokens or later ones: `decoder_mask`. One pass over the sequence
    serves every canvas of the response, as in NeMo AutoModel's recipe; the result equals encoding each
    canvas's prefix on its own (checked by `hack/train_tiny.py --check-mask`).
    """

    tokens: torch.Tensor  # (B, S) left-padded
    token_mask: torch.Tensor  # (B, S) bool
    positions: torch.Tensor  # (B, S)
    canvas: torch.Tensor  # (B, C * L) clean canvases, side by side
    canvas_positions: torch.Tensor  # (B, C * L)
    canvas_valid: torch.Tensor  # (B, C * L) bool: False on the filler canvases of shorter responses
    decoder_mask: torch.Tensor  # (B, 1, C * L, S + C * L) bool: True = may attend


def collate(examples: Sequence[Example], length: int) -> Batch:
    """Left-pad the sequences (exact with a mask); every row's positions start at 0, as a lone request's do."""
    width = max(len(e.tokens) for e in examples)
    count = max(e.canvases(length) for e in examples)
    n, q = len(examples), count * length
    tokens = torch.full((n, width), PAD_ID, dtype=torch.long)
    token_mask = torch.zeros((n, width), dtype=torch.bool)
    positions = torch.zeros((n, width), dtype=torch.long)
    canvas = torch.full((n, q), EOS_ID, dtype=torch.long)
    canvas_positions = torch.zeros((n, q), dtype=torch.long)
    valid = torch.zeros((n, q), dtype=torch.bool)
    mask = torch.zeros((n, 1, q, width + q), dtype=torch.bool)
    for i, e in enumerate(examples):
        m, pad = len(e.tokens), width - len(e.tokens)
        tokens[i, pad:] = torch.tensor(e.tokens)
        token_mask[i, pad:] = True
        positions[i, pad:] = torch.arange(m)
        for k in range(count):
            rows = slice(k * length, (k + 1) * length)
            mask[i, 0, rows, width + k * length : width + (k + 1) * length] = True  # itself
            if k >= e.canvases(length):
                continue  # filler: attends to itself only, carries no loss
            start = e.prompt_length + k * length
            canvas[i, rows] = torch.tensor(e.tokens[start : start + length])
            canvas_positions[i, rows] = torch.arange(start, start + length)
            valid[i, rows] = True
            mask[i, 0, rows, pad : pad + start] = True  # the clean prefix
    return Batch(tokens, token_mask, positions, canvas, canvas_positions, valid, mask)


# ---- the objective -----------------------------------------------------------------------------


def corrupt(canvas: torch.Tensor, length: int, vocab_size: int, eps: float, generator: torch.Generator) -> torch.Tensor:
    """Replace each position with a uniform random token with probability t ~ U(eps, 1), one t per canvas."""
    n, q = canvas.shape
    t = eps + (1 - eps) * torch.rand((n, q // length, 1), generator=generator)
    replace = torch.rand((n, q // length, length), generator=generator) < t
    noise = torch.randint(0, vocab_size, canvas.shape, generator=generator)
    return torch.where(replace.view(n, q), noise, canvas)


def _lm_logits(model: Any, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head with the model's final soft-cap, as its forward applies it."""
    cap = model.final_logit_softcapping
    return torch.tanh(model.lm_head(hidden).float() / cap) * cap


@dataclass(frozen=True)
class Losses:
    """The two terms of one batch."""

    diffusion: torch.Tensor
    encoder: torch.Tensor


def encode(model: Any, batch: Batch) -> tuple[Any, torch.Tensor]:
    """The encoder over the whole clean sequences: the cache every canvas reads, and its hidden states."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config.get_text_config())
    out = model.model.encoder(input_ids=batch.tokens, attention_mask=batch.token_mask, position_ids=batch.positions,
                              past_key_values=cache, use_cache=True)
    return cache, out.last_hidden_state


def decode(model: Any, batch: Batch, cache: Any, noisy: torch.Tensor, sc_logits: torch.Tensor | None = None,
           sc_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Decoder logits for every canvas at once, each seeing only its own prefix."""
    masks = {kind: batch.decoder_mask for kind in set(model.config.text_config.layer_types)}
    return model(decoder_input_ids=noisy, past_key_values=cache, decoder_attention_mask=masks,
                 decoder_position_ids=batch.canvas_positions, self_conditioning_logits=sc_logits,
                 self_conditioning_mask=sc_mask).logits


def losses(model: Any, batch: Batch, recipe: Recipe, generator: torch.Generator, train: bool = True) -> Losses:
    """Diffusion cross-entropy on every canvas and the encoder's next-token loss on the clean sequence."""
    vocab = int(model.config.text_config.vocab_size)
    cache, hidden = encode(model, batch)
    ar_logits = _lm_logits(model, hidden[:, :-1])
    ar_targets = batch.tokens[:, 1:].masked_fill(~batch.token_mask[:, 1:], -100)
    encoder_loss = F.cross_entropy(ar_logits.reshape(-1, vocab), ar_targets.reshape(-1), ignore_index=-100)

    noisy = corrupt(batch.canvas, recipe.spec.canvas_length, vocab, recipe.noise_eps, generator)
    sc_logits = sc_mask = None
    if recipe.self_conditioning_p > 0:
        with torch.no_grad():
            sc_logits = decode(model, batch, cache, noisy)
        p = recipe.self_conditioning_p if train else 0.0
        sc_mask = torch.rand(batch.canvas.shape[0], generator=generator) < p
    logits = decode(model, batch, cache, noisy, sc_logits, sc_mask)
    targets = batch.canvas.masked_fill(~batch.canvas_valid, -100)
    diffusion = F.cross_entropy(logits.reshape(-1, vocab), targets.reshape(-1), ignore_index=-100)
    return Losses(diffusion, encoder_loss)


@torch.no_grad()
def check_mask(seed: int = 0) -> float:
    """Largest logit difference between the one-pass batch and encoding each canvas's prefix on its own."""
    from transformers import DynamicCache

    torch.manual_seed(seed)
    spec, length = SPEC, SPEC.canvas_length
    model = build_model(512, spec, seed).eval()
    rng = random.Random(seed)
    examples = [Example([rng.randrange(10, 512) for _ in range(p + k * length)], p)
                for p, k in ((5, 3), (17, 1), (9, 2))]
    batch = collate(examples, length)
    noisy = torch.randint(0, 512, batch.canvas.shape)
    cache, _ = encode(model, batch)
    together = decode(model, batch, cache, noisy)
    worst = 0.0
    for i, e in enumerate(examples):
        for k in range(e.canvases(length)):
            start = e.prompt_length + k * length
            alone_cache = DynamicCache(config=model.config.get_text_config())
            prefix = torch.tensor([e.tokens[:start]])
            model.model.encoder(input_ids=prefix, past_key_values=alone_cache, use_cache=True)
            rows = slice(k * length, (k + 1) * length)
            alone = model(decoder_input_ids=noisy[i : i + 1, rows], past_key_values=alone_cache,
                          decoder_position_ids=torch.arange(start, start + length).unsqueeze(0)).logits
            worst = max(worst, float((alone[0] - together[i, rows]).abs().max()))
    return worst


def lr_at(step: int, recipe: Recipe) -> float:
    """Linear warm-up, then cosine decay to min_lr."""
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    return recipe.min_lr + 0.5 * (recipe.lr - recipe.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


# ---- the run -----------------------------------------------------------------------------------


def build_model(vocab_size: int, spec: TinyModelSpec, seed: int) -> Any:
    """A freshly initialised model of SPEC (the same initialisation for the same seed)."""
    from transformers import DiffusionGemmaForBlockDiffusion

    torch.manual_seed(seed)
    return DiffusionGemmaForBlockDiffusion(tiny_config(spec, vocab_size))


def heldout_batches(examples: Examples, count: int) -> list[Batch]:
    """Fixed held-out batches (drawn once, the same for every evaluation)."""
    size, length = examples.recipe.batch_size, examples.recipe.spec.canvas_length
    return [collate([examples.draw() for _ in range(size)], length) for _ in range(count)]


@torch.no_grad()
def evaluate(model: Any, batches: Sequence[Batch], recipe: Recipe, seed: int) -> dict[str, float]:
    """Mean held-out losses (a fixed noise draw, no self-conditioning)."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    parts = [losses(model, b, recipe, generator, train=False) for b in batches]
    model.train()
    return {"diffusion": sum(float(p.diffusion) for p in parts) / len(parts),
            "encoder": sum(float(p.encoder) for p in parts) / len(parts)}


def batches(examples: Examples, size: int, pool: int = 8) -> Iterator[Batch]:
    """Batches of similar length (drawn `pool` batches at a time, sorted, shuffled): little padding to compute."""
    while True:
        drawn = sorted((examples.draw() for _ in range(size * pool)),
                       key=lambda e: (e.canvases(examples.canvas), len(e.tokens)))
        chunks = [drawn[i : i + size] for i in range(0, len(drawn), size)]
        examples.rng.shuffle(chunks)
        for chunk in chunks:
            yield collate(chunk, examples.canvas)


def train(
    out: Path, recipe: Recipe, log_every: int = 50, eval_every: int = 500, snapshots: bool = False,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Train, save the checkpoint and tokenizer to `out`, and return the run's record.

    `stop_after`: end after that many steps of the recipe's schedule (the same weights as the full run has
    at that step, since the schedule and the data order do not depend on where it stops).
    """
    last = recipe.steps if stop_after is None else min(stop_after, recipe.steps)
    torch.set_num_threads(recipe.threads)
    random.seed(recipe.seed)
    torch.manual_seed(recipe.seed)
    passages = corpus()
    train_set = [p for p in passages if not is_heldout(p, recipe.heldout_share)]
    heldout = [p for p in passages if is_heldout(p, recipe.heldout_share)]
    tokenizer = fast_tokenizer(bpe_tokenizer([p.text for p in train_set], recipe.spec.bpe_vocab_size))
    vocab_size = -(-len(tokenizer) // 64) * 64
    model = build_model(vocab_size, recipe.spec, recipe.seed)
    model.train()
    params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "vision" not in n]
    other = [p for n, p in model.named_parameters() if p.ndim < 2 and "vision" not in n]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                                   {"params": other, "weight_decay": 0.0}], lr=recipe.lr, betas=(0.9, 0.95))
    rng = random.Random(recipe.seed)
    train_examples = Examples(train_set, tokenizer, recipe, rng)
    eval_batches = heldout_batches(Examples(heldout, tokenizer, recipe, random.Random(recipe.seed + 1)), 8)
    generator = torch.Generator().manual_seed(recipe.seed)
    history: list[dict[str, float]] = []
    started = time.monotonic()
    smooth: dict[str, float] = {}
    print(f"{len(train_set)} training passages, {len(heldout)} held out, vocabulary {len(tokenizer)} "
          f"(model {vocab_size}), {params / 1e6:.2f}M parameters, {recipe.threads} threads", flush=True)
    for step, batch in zip(range(last), batches(train_examples, recipe.batch_size), strict=False):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, recipe)
        parts = losses(model, batch, recipe, generator)
        loss = parts.diffusion + recipe.encoder_loss_weight * parts.encoder
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        optimizer.step()
        for key, value in (("diffusion", parts.diffusion.item()), ("encoder", parts.encoder.item())):
            smooth[key] = value if key not in smooth else 0.98 * smooth[key] + 0.02 * value
        if (step + 1) % log_every == 0:
            print(f"step {step + 1}/{recipe.steps} diffusion {smooth['diffusion']:.3f} encoder "
                  f"{smooth['encoder']:.3f} lr {lr_at(step, recipe):.2e} {time.monotonic() - started:.0f} s",
                  flush=True)
        if (step + 1) % eval_every == 0 or step + 1 == last:
            held = evaluate(model, eval_batches, recipe, recipe.seed + 2)
            history.append({"step": step + 1, "elapsed_s": round(time.monotonic() - started, 1),
                            "train_diffusion": round(smooth["diffusion"], 4),
                            "train_encoder": round(smooth["encoder"], 4),
                            "heldout_diffusion": round(held["diffusion"], 4),
                            "heldout_encoder": round(held["encoder"], 4)})
            print(f"  held out: diffusion {held['diffusion']:.3f} encoder {held['encoder']:.3f}", flush=True)
            if snapshots:  # a look at the model while it trains (not part of the result)
                save(model, tokenizer, out / "snapshot", {"step": step + 1})
    record = {
        "recipe": {**asdict(recipe), "spec": asdict(recipe.spec)},
        "parameters": params,
        "passages": {"train": len(train_set), "heldout": len(heldout)},
        "corpus_sha256": hashlib.sha256("\n".join(p.text for p in passages).encode()).hexdigest(),
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                     "transformers": _version("transformers"), "tokenizers": _version("tokenizers")},
        "steps_run": last,
        "train_seconds": round(time.monotonic() - started, 1),
        "history": history,
    }
    save(model, tokenizer, out, record)
    return record


def _version(package: str) -> str:
    from importlib import metadata

    return metadata.version(package)


def save(model: Any, tokenizer: Any, out: Path, record: dict[str, Any]) -> None:
    """Write the checkpoint (bf16 weights: half the bytes; the worker loads them as fp32 on a CPU)."""
    from transformers.models.diffusion_gemma import DiffusionGemmaGenerationConfig

    out.mkdir(parents=True, exist_ok=True)
    copy = deepcopy(model).eval().to(torch.bfloat16)
    copy.generation_config = DiffusionGemmaGenerationConfig(
        bos_token_id=BOS_ID, eos_token_id=[EOS_ID, SPECIAL_TOKENS.index(END_OF_TURN)], pad_token_id=PAD_ID,
        max_denoising_steps=48,
    )
    copy.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "training.json").write_text(json.dumps(record, indent=1) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="where to write the checkpoint")
    parser.add_argument("--steps", type=int, default=Recipe.steps)
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--snapshots", action="store_true", help="also save the model at every evaluation")
    parser.add_argument("--stop-after", type=int, default=None,
                        help="end after this many steps of the --steps schedule (the full run's weights there)")
    parser.add_argument("--check-mask", action="store_true",
                        help="only check that one pass over a batch equals encoding each canvas's prefix alone")
    args = parser.parse_args(argv)
    if args.check_mask:
        worst = check_mask()
        print(f"largest logit difference: {worst:.2e}")
        return 0 if worst < 1e-3 else 1
    if args.out is None:
        parser.error("--out is required")
    record = train(args.out, Recipe(steps=args.steps), eval_every=args.eval_every, snapshots=args.snapshots,
                   stop_after=args.stop_after)
    print(json.dumps(record["history"][-1]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
