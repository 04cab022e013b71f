"""The denoising step's math as pure tensor functions: no host syncs and no Python loops over rows.

Transformers 5.23's `_denoising_step` samples every position with `torch.multinomial` (which checks its
input on the host), computes a `Categorical` entropy twice (acceptance and stopping), and its batch paths
index with boolean masks; each of those stalls a GPU behind the CPU. Here everything a step decides is
computed on the device from device tensors, and random numbers come in as tensors the caller drew from
each request's own generator, so the same functions run eagerly or inside `torch.compile`:

- `processed_logits`: the temperature schedule, per row, from device step counters (the same double
  arithmetic as transformers' `LinearTemperatureScheduleLogitsProcessor`, so the same float32 values);
- `categorical` and `take_entropy`: argmax, probabilities and entropy. The entropy is computed with
  exactly the operations `torch.distributions.Categorical` uses, so it is bitwise equal to transformers'
  (tested in fp32); it is computed once and serves both acceptance and the stop rule. One canvas x
  vocabulary work buffer serves the whole step: the probabilities live in it until the entropy's product
  is written over them;
- `acceptance_mask`: the lowest-entropy positions while (sum - largest) <= bound, via sort + cumsum;
- `sample`: one token per position by inverse-CDF sampling in two levels (blocks of the vocabulary,
  then within the block), which reads the probabilities once instead of drawing a random number per
  vocabulary entry; every position is sampled and combined with the renoising draw by `torch.where`,
  never by indexing (sampling only the accepted positions needs a `nonzero`, a host sync, and measured
  no faster on a CPU either: docs/engine.md);
- `stop_rule`: transformers' stable-and-confident rule with the argmax history as a device ring buffer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StepResult:
    """What one denoising step decides for a batch of canvases (rows)."""

    next_canvas: torch.Tensor  # (B, L) the canvas fed to the next step
    argmax_canvas: torch.Tensor  # (B, L) the current draft, committed when the row stops
    accepted: torch.Tensor  # (B, L) bool: positions taken from the denoiser this step
    entropy: torch.Tensor  # (B, L) per-position entropy of the temperature-scaled distribution
    self_conditioning: torch.Tensor  # (B, L, V) log-probabilities: softmax equals the processed logits'


def temperature(t_min: float, t_max: float, cur_step: int, max_steps: int) -> float:
    """The linear schedule: t_max at the first step (cur_step == max_steps), t_min + small at the last."""
    return t_min + (t_max - t_min) * (cur_step / max_steps)


def temperatures(
    t_min: torch.Tensor, t_max: torch.Tensor, remaining: torch.Tensor, max_steps: torch.Tensor
) -> torch.Tensor:
    """`temperature` per row, on the device: float64 like Python's floats, then float32 like the logits."""
    return (t_min + (t_max - t_min) * (remaining.double() / max_steps)).float()


@dataclass(frozen=True)
class Categorical:
    """The per-position distribution of the processed logits."""

    argmax: torch.Tensor  # (B, L)
    log_probs: torch.Tensor  # (B, L, V) the processed logits shifted by their logsumexp (same softmax)
    probs: torch.Tensor  # (B, L, V) in the work buffer, until `take_entropy` writes over them


def categorical(processed: torch.Tensor, *, work: torch.Tensor) -> Categorical:
    """Argmax, normalized logits and probabilities of softmax(processed), bitwise as transformers computes them.

    `Categorical(logits=x)` normalizes x - x.logsumexp(-1) and takes probs = softmax of that; the same
    operations in the same order give the same bits. `processed` is overwritten with the normalized
    log-probabilities; `work`, a buffer of its shape, ends up holding the probabilities, so a step
    allocates nothing of canvas x vocabulary size.
    """
    # One pass gives the maximum (logsumexp's shift) and its first position (argmax's answer): on a CPU
    # `argmax` alone costs twice what `max` does, and `amax` is a third pass.
    peak, argmax = processed.max(dim=-1, keepdim=True)
    # logsumexp, step by step as ATen does it, into the work buffer instead of a fresh tensor.
    exps = torch.sub(processed, peak, out=work).exp_()
    lse = exps.sum(dim=-1, keepdim=True).log_().add_(peak.masked_fill(peak.abs() == math.inf, 0))
    log_probs = processed.sub_(lse)
    probs = torch.ops.aten._softmax.out(log_probs, -1, False, out=work)
    return Categorical(argmax.squeeze(-1), log_probs, probs)


def take_entropy(dist: Categorical) -> torch.Tensor:
    """The entropy, bitwise `Categorical`'s -sum(clamp(logits) * probs): the product is written over
    `dist.probs` (the work buffer), which no longer holds the probabilities afterwards.

    (The clamp to the dtype's minimum only changes -inf, which soft-capped logits at a positive
    temperature never hold; the product is commutative, so in place over the probabilities is the same
    bits as Categorical's logits * probs.)
    """
    return dist.probs.mul_(dist.log_probs).sum(dim=-1).neg_()


def acceptance_mask(entropy: torch.Tensor, entropy_bound: float | torch.Tensor) -> torch.Tensor:
    """Accept the lowest-entropy positions while (sum of their entropies - the largest) <= bound."""
    sorted_entropy, order = torch.sort(entropy, dim=-1, descending=False)
    cumulative = torch.cumsum(sorted_entropy, dim=-1)
    if isinstance(entropy_bound, torch.Tensor):
        entropy_bound = entropy_bound.view(-1, 1)
    selected = cumulative - sorted_entropy <= entropy_bound
    return torch.scatter(torch.zeros_like(selected), dim=-1, index=order, src=selected)


def vocab_block(vocab_size: int) -> int:
    """The block size of two-level sampling: a power of two up to 256 that divides the vocabulary."""
    return math.gcd(vocab_size, 256)


def sample(probs: torch.Tensor, uniforms: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """One token per position of (B, L, V) probabilities, given one uniform in [0, 1) per position.

    Inverse-CDF sampling in two levels: the cumulative mass of vocabulary blocks picks a block, the
    cumulative mass inside it picks the token. Exact up to float rounding; where rounding lands on a
    token of zero probability (at most ~1e-7 of draws) `fallback` (the argmax) is taken instead.
    """
    b, length, vocab = probs.shape
    block = vocab_block(vocab)
    blocks = probs.view(b, length, vocab // block, block)
    block_mass = blocks.sum(dim=-1)
    block_cdf = block_mass.cumsum(dim=-1)
    target = (uniforms * block_cdf[..., -1]).unsqueeze(-1)
    k = torch.searchsorted(block_cdf, target, right=True).clamp_(max=vocab // block - 1)
    below = torch.gather(block_cdf, -1, k) - torch.gather(block_mass, -1, k)
    inside = torch.gather(blocks, 2, k.unsqueeze(-1).expand(b, length, 1, block)).squeeze(2)
    j = torch.searchsorted(inside.cumsum(dim=-1), target - below, right=True).clamp_(max=block - 1)
    token = (k * block + j).squeeze(-1)
    possible = torch.gather(probs, -1, token.unsqueeze(-1)).squeeze(-1) > 0
    return torch.where(possible, token, fallback)


def denoise_step(
    logits: torch.Tensor,
    *,
    temperatures: torch.Tensor,
    entropy_bounds: torch.Tensor,
    uniforms: torch.Tensor,
    noise: torch.Tensor,
    work: torch.Tensor,
) -> StepResult:
    """Accept, sample and renoise one step for each row: pure tensor math, no host syncs.

    `logits` (B, L, V, float32) are overwritten: divided by the temperature, then shifted to
    log-probabilities, which become the next step's self-conditioning (the decoder only takes their
    softmax); `work` is a buffer of their shape. `uniforms` (B, L) and `noise` (B, L) are the step's
    random draws, made by the caller from each request's own generator: one uniform per position for
    sampling, one uniform token per position for renoising. Rejected positions take the noise; accepted
    ones the sample (stock's accept-then-renoise is the same where).
    """
    processed = logits.div_(temperatures.view(-1, 1, 1).to(logits.dtype))
    dist = categorical(processed, work=work)
    sampled = sample(dist.probs, uniforms, dist.argmax)  # before the entropy's product takes the work buffer
    entropy = take_entropy(dist)
    accepted = acceptance_mask(entropy, entropy_bounds)
    return StepResult(torch.where(accepted, sampled, noise), dist.argmax, accepted, entropy, dist.log_probs)


def stop_rule(
    history: torch.Tensor,
    step: torch.Tensor,
    argmax: torch.Tensor,
    entropy: torch.Tensor,
    stability_threshold: torch.Tensor,
    confidence_threshold: torch.Tensor,
) -> torch.Tensor:
    """Transformers' stable-and-confident rule per row, with the argmax history as a device ring buffer.

    `history` (K, B, L) holds the last K argmax canvases (-1 where not yet written) and `step` (a 0-d
    device tensor) counts the steps of this canvas; row r is stable when its argmax equals each of its
    `stability_threshold[r]` most recent ones (always, for 0), and confident when its mean entropy is
    below `confidence_threshold[r]`. Records this step's argmax in the buffer.
    """
    size = history.shape[0]
    if size:
        slots = torch.arange(size, device=history.device)
        age = torch.remainder(step - 1 - slots, size)  # 0 = the previous step
        relevant = age.unsqueeze(1) < stability_threshold.unsqueeze(0)  # (K, B)
        same = (history == argmax.unsqueeze(0)).all(dim=-1)  # (K, B)
        stable = (same | ~relevant).all(dim=0)
        history.index_copy_(0, torch.remainder(step, size).view(1), argmax.unsqueeze(0))
    else:
        stable = torch.ones(argmax.shape[0], dtype=torch.bool, device=argmax.device)
    confident = torch.mean(entropy, dim=-1) < confidence_threshold
    return stable & confident
