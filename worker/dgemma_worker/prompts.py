"""Prompts to token ids and back, bounded before any work is spent and without long GIL holds.

A prompt is refused by its size first (`check_size`: UTF-8 bytes of text and chat messages, the count of
token ids), which costs a length or one encode per string, on the event loop. Only then is it tokenized, on a
worker thread (`WorkerRuntime`). A thread alone is not enough, because the GIL decides whether the event loop
runs meanwhile. Measured on the tiny tokenizer with 500 KiB of text (~500k tokens), from a thread:

- the `tokenizers` backend's `encode`, and transformers' wrapper around it, hold the GIL for the whole call
  (2-5 s of event-loop stall);
- `encode_batch` releases it while it works, but freeing its Encoding (offsets and token strings for every
  token) holds it for 100-360 ms, and reading `.ids` for ~300 ms;
- `encode_batch_fast` (no offsets) releases it too, is ~3x faster, and its Encoding frees in 10-25 ms.

So text goes through `encode_batch_fast` with one item (the same ids), and the count is checked on the encoding
(`len`) before the ids are read, so a prompt over the token limit never builds its id list. Chat templates are
rendered by transformers (Jinja in Python, which yields the GIL at the interpreter's switch interval) and the
rendered text is encoded the same way; a template that refuses the messages is the client's error.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dgemma_common.convert import MAX_CHAT_MESSAGES
from dgemma_common.logsafe import clip
from dgemma_common.params import Limits, ParamError, utf8_size
from dgemma_common.types import Prompt, PromptTooLongError

MAX_ROLE_CHARS = 64


def prompt_bytes(prompt: Prompt, bound: int) -> int:
    """The UTF-8 size of a text or chat prompt; exact up to `bound`, past it some number over it."""
    messages = prompt.messages or ()
    return utf8_size([prompt.text] if prompt.text is not None else [s for m in messages for s in (m.role, m.text)],
                     bound)


def check_size(prompt: Prompt, limits: Limits) -> None:
    """Refuse a prompt that is certainly over the limits, before any tokenizing."""
    if prompt.token_ids is not None:
        if len(prompt.token_ids) > limits.max_prompt_tokens:
            raise PromptTooLongError(len(prompt.token_ids), limits.max_prompt_tokens)
        return
    if prompt.messages is not None:
        if len(prompt.messages) > MAX_CHAT_MESSAGES:
            raise ParamError("prompt.chat", f"at most {MAX_CHAT_MESSAGES} messages, got {len(prompt.messages)}")
        for i, m in enumerate(prompt.messages):
            if len(m.role) > MAX_ROLE_CHARS:
                raise ParamError(f"prompt.chat.messages[{i}].role", f"at most {MAX_ROLE_CHARS} characters")
    bound = limits.prompt_byte_limit
    size = prompt_bytes(prompt, bound)
    if size > bound:
        raise ParamError("prompt", f"{size} bytes exceeds the limit of {bound} bytes (--max-prompt-bytes) "
                                   "before tokenizing")


def encode(tokenizer: Any, prompt: Prompt, vocab_size: int, max_tokens: int | None = None) -> list[int]:
    """Token ids for a prompt: raw text with the tokenizer's special tokens, chat through the chat template.

    With `max_tokens`, a prompt that tokenizes to more is refused (PromptTooLongError) before its ids are read.
    """
    if prompt.token_ids is not None:
        ids = list(prompt.token_ids)
        check_ids(ids, vocab_size, "prompt.token_ids")
    elif prompt.messages is not None:
        if not prompt.messages:
            raise ParamError("prompt.messages", "must not be empty")
        messages = [{"role": m.role, "content": m.text} for m in prompt.messages]
        rendered = render_chat(tokenizer, messages)
        ids = _encode(tokenizer, rendered, False, max_tokens)
    elif prompt.text is not None:
        ids = _encode(tokenizer, prompt.text, True, max_tokens)
    else:
        raise ParamError("prompt", "one of text, messages or token_ids is required")
    if not ids:
        raise ParamError("prompt", "must not be empty")
    return list(ids)


def _encode(tokenizer: Any, text: str, add_special_tokens: bool, max_tokens: int | None) -> list[int]:
    # Not encode: it holds the GIL while it works (see the module docstring).
    [encoding] = tokenizer.backend_tokenizer.encode_batch_fast([text], add_special_tokens=add_special_tokens)
    if max_tokens is not None and len(encoding) > max_tokens:
        raise PromptTooLongError(len(encoding), max_tokens)
    return list(encoding.ids)


def render_chat(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The chat template applied to `messages`, with the generation prompt; a refusal names prompt.chat."""
    from jinja2.exceptions import TemplateError

    try:
        return str(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
    except TemplateError as exc:
        raise ParamError("prompt.chat", f"the model's chat template refused the messages: {clip(exc, 200)}") from None


def check_ids(ids: Sequence[int], vocab_size: int, field: str = "token_ids") -> None:
    """Refuse ids outside the vocabulary (tokenizers would answer '' or raise OverflowError)."""
    if ids and not (min(ids) >= 0 and max(ids) < vocab_size):
        bad = next(t for t in ids if not 0 <= t < vocab_size)
        raise ParamError(field, f"ids must be in [0, {vocab_size}), got {bad}")
