"""The sync-free denoising step decides exactly what transformers' stock step decides, and samples the same
distribution: entropy and argmax bitwise equal in fp32, acceptance and stopping equal, token frequencies
indistinguishable from transformers' multinomial sampler by a chi-square test."""

from __future__ import annotations

import torch
from transformers import LogitsProcessorList
from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
    EntropyBoundSampler,
    EntropyBoundSamplerConfig,
    LinearTemperatureScheduleLogitsProcessor,
    StableAndConfidentStoppingCriteria,
)

from dgemma_worker.model import LoadedModel
from dgemma_worker.sampling import (
    acceptance_mask,
    categorical,
    denoise_step,
    sample,
    stop_rule,
    take_entropy,
    temperature,
    temperatures,
)

# Chi-square critical values at p = 0.001 by degrees of freedom: a correct sampler fails one such test in a
# thousand seeds, and the seeds here are fixed, so the tests are deterministic.
CHI2_CRITICAL_0_001 = {5: 20.52, 7: 24.32}


def random_logits(seed: int, batch: int = 2, length: int = 64, vocab: int = 512, scale: float = 4.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.tanh(torch.randn(batch, length, vocab, generator=g) * scale / 30) * 30


def buffers(like: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"work": torch.empty_like(like)}


def entropy_of(logits: torch.Tensor) -> torch.Tensor:
    return take_entropy(categorical(logits.clone(), **buffers(logits)))


def draws(batch: int, length: int, vocab: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"uniforms": torch.rand(batch, length, generator=g), "noise": torch.randint(0, vocab, (batch, length),
                                                                                        generator=g)}


def test_entropy_and_argmax_are_bitwise_transformers_and_probabilities_its_softmax() -> None:
    for seed in range(5):
        processed = random_logits(seed, scale=1.0 + 10 * seed) / 0.6
        stock = torch.distributions.Categorical(logits=processed)
        ours = categorical(processed.clone(), **buffers(processed))
        assert torch.equal(ours.argmax, torch.argmax(processed, dim=-1))
        assert torch.equal(ours.probs, stock.probs)
        assert torch.allclose(ours.log_probs.softmax(-1), processed.softmax(-1), rtol=0, atol=1e-7)
        assert torch.equal(take_entropy(ours), stock.entropy())
    tied = random_logits(7)
    tied[..., 5] = tied[..., 9] = tied.amax(-1) + 1  # argmax takes the first of equal maxima
    assert torch.equal(categorical(tied.clone(), **buffers(tied)).argmax, torch.argmax(tied, dim=-1))


def test_device_temperatures_are_the_stock_schedule_to_the_bit() -> None:
    logits = random_logits(1, batch=3)
    remaining = torch.tensor([48, 30, 1])
    t = temperatures(torch.tensor([0.4] * 3, dtype=torch.float64), torch.tensor([0.8] * 3, dtype=torch.float64),
                     remaining, torch.tensor([48.0] * 3, dtype=torch.float64))
    for row, cur_step in enumerate(remaining.tolist()):
        stock = LinearTemperatureScheduleLogitsProcessor(0.4, 0.8, 48)(None, logits[row], cur_step)  # type: ignore[arg-type]
        assert torch.equal(logits[row] / t[row], stock)
        assert float(t[row]) == torch.tensor(temperature(0.4, 0.8, cur_step, 48), dtype=torch.float32).item()


def test_acceptance_matches_the_stock_sampler_on_the_same_logits() -> None:
    for seed in range(8):
        logits = random_logits(seed, scale=2.0 + seed)
        for bound in (0.01, 0.1, 1.0, 10.0):
            sampler = EntropyBoundSampler(EntropyBoundSamplerConfig(entropy_bound=bound), 64, 512, 48)
            current = torch.zeros(2, 64, dtype=torch.long)
            sampler.accept_canvas(current, current + 1, logits, cur_step=3)
            entropy = entropy_of(logits)
            assert torch.equal(acceptance_mask(entropy, bound), sampler.accepted_token_mask)
            assert torch.equal(acceptance_mask(entropy, torch.tensor([bound, bound])), sampler.accepted_token_mask)


def test_the_stop_rule_matches_the_stock_criteria_step_by_step_with_per_row_thresholds() -> None:
    """Rows of one batch with different stability thresholds, each against its own stock criteria."""
    ks = [0, 1, 2, 3]
    stocks = [StableAndConfidentStoppingCriteria(stability_threshold=k, confidence_threshold=2.0) for k in ks]
    history = torch.full((max(ks), len(ks), 64), -1, dtype=torch.long)
    step = torch.zeros((), dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    fixed = torch.randint(0, 512, (len(ks), 64), generator=g)
    for n in range(10):
        sharp = random_logits(n, batch=len(ks), scale=40.0 if n > 4 else 1.0)
        argmax = fixed if n % 4 else torch.randint(0, 512, (len(ks), 64), generator=g)
        entropy = entropy_of(sharp)
        ours = stop_rule(history, step, argmax, entropy, torch.tensor(ks), torch.full((len(ks),), 2.0))
        step += 1
        for r, stock in enumerate(stocks):
            assert bool(ours[r]) == bool(stock(argmax[r : r + 1], sharp[r : r + 1])[0]), (ks[r], n)


def chi_square(counts: torch.Tensor, expected: torch.Tensor) -> float:
    return float(((counts - expected) ** 2 / expected).sum())


def test_sampled_frequencies_match_transformers_multinomial_by_chi_square() -> None:
    """Goodness of fit to softmax(x / t), and homogeneity with transformers' own `torch.multinomial` draws."""
    vocab, n = 6, 20000
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0]).expand(1, n, vocab).contiguous()
    step = denoise_step(logits.clone(), temperatures=torch.tensor([0.5]), entropy_bounds=torch.tensor([1e9]),
                        **draws(1, n, vocab, seed=0), **buffers(logits))
    assert bool(step.accepted.all())
    ours = torch.bincount(step.next_canvas[0], minlength=vocab).double()
    probs = torch.softmax(logits[0, 0] / 0.5, -1).double()
    assert chi_square(ours, probs * n) < CHI2_CRITICAL_0_001[5]
    # transformers' sampler: multinomial over softmax(processed), as `_denoising_step` calls it
    stock_draws = torch.multinomial(torch.softmax(logits[0] / 0.5, -1), 1, generator=torch.Generator().manual_seed(1))
    stock = torch.bincount(stock_draws[:, 0], minlength=vocab).double()
    pooled = (ours + stock) / (2 * n)
    assert chi_square(ours, pooled * n) + chi_square(stock, pooled * n) < CHI2_CRITICAL_0_001[5]
    # The test can fail: the same draws at the wrong temperature are far outside the bound.
    wrong = torch.softmax(logits[0, 0], -1).double()
    assert chi_square(ours, wrong * n) > 100 * CHI2_CRITICAL_0_001[5]


def test_two_level_sampling_covers_every_block_of_a_larger_vocabulary() -> None:
    """A vocabulary of several blocks: each token's frequency fits its probability (8 bins by value)."""
    vocab, n = 1024, 40000
    g = torch.Generator().manual_seed(3)
    probs = torch.softmax(torch.randn(vocab, generator=g) * 2, -1)
    probs[5] = 0.0  # an impossible token is never drawn
    probs /= probs.sum()
    tokens = sample(probs.expand(1, n, vocab).contiguous(), torch.rand(1, n, generator=g), torch.zeros(1, n,
                                                                                                    dtype=torch.long))
    counts = torch.bincount(tokens[0], minlength=vocab).double()
    assert counts[5] == 0
    # Bin the vocabulary into 8 groups of similar mass, so every bin expects many draws.
    order = torch.argsort(probs)
    bins = torch.zeros(vocab, dtype=torch.long)
    bins[order] = (torch.cumsum(probs[order], 0) * 8).clamp(max=7.999).long()
    observed = torch.zeros(8, dtype=torch.double).index_add_(0, bins, counts)
    expected = torch.zeros(8, dtype=torch.double).index_add_(0, bins, probs.double() * n)
    assert chi_square(observed, expected) < CHI2_CRITICAL_0_001[7]


def test_rejected_positions_are_renoised_and_accepted_ones_sampled() -> None:
    vocab = 50
    sharp = torch.full((1, 8, vocab), -30.0)
    sharp[0, :, 7] = 30.0  # a certain token everywhere: entropy ~0
    sharp[0, 4:, :] = 0.0  # uniform (max entropy) on the second half
    noise = torch.arange(8).view(1, 8) + 100
    step = denoise_step(sharp.clone(), temperatures=torch.tensor([1.0]), entropy_bounds=torch.tensor([0.1]),
                        uniforms=torch.rand(1, 8), noise=noise, **buffers(sharp))
    # The bound excludes the largest entropy, so exactly one high-entropy position rides along.
    assert step.accepted[0, :4].all() and int(step.accepted[0, 4:].sum()) == 1
    assert (step.next_canvas[0, :4] == 7).all()
    assert torch.equal(step.next_canvas[~step.accepted], noise[~step.accepted])


def test_the_step_decides_like_the_stock_step_of_the_real_model(loaded: LoadedModel) -> None:
    """Run transformers' own `_denoising_step` on the tiny model and replay its logits through ours."""
    model = loaded.model
    length, vocab = loaded.canvas_length, loaded.vocab_size
    prompt = torch.tensor([[2, 40, 41, 42, 43]])
    cache = model._prepare_cache_for_generation(model.generation_config, batch_size=1, max_length=64)
    positions = torch.arange(0, 5, dtype=torch.int32).unsqueeze(0)
    with torch.inference_mode():
        ids, mask = model._prepare_encoder_inputs(
            input_ids=prompt, attention_mask=torch.ones(1, 5, dtype=torch.bool), encoder_position_ids=positions,
            past_key_values=cache, is_prefill=True, canvas_length=length, batch_size=1,
        )
        model.model.encoder(input_ids=ids, attention_mask=mask, past_key_values=cache, position_ids=positions)
        canvas = torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(5))
        dec_mask = model.model.decoder.create_diffusion_decoder_attention_mask(
            config=model.config, inputs_embeds=canvas.unsqueeze(-1), past_key_values=cache,
            decoder_attention_mask=torch.ones(1, 5 + length, dtype=torch.bool),
        )
        dec_positions = torch.arange(5, 5 + length, dtype=torch.int32).unsqueeze(0)
        captured: dict[str, torch.Tensor] = {}
        original_forward = model.forward

        def capture(*args: object, **kwargs: object) -> object:
            out = original_forward(*args, **kwargs)
            captured["logits"] = out.logits.clone()
            return out

        sampler = EntropyBoundSampler(EntropyBoundSamplerConfig(entropy_bound=0.5), length, vocab, 8)
        stopping = StableAndConfidentStoppingCriteria(stability_threshold=0, confidence_threshold=1e9)
        schedule = LogitsProcessorList([LinearTemperatureScheduleLogitsProcessor(0.4, 0.8, 8)])
        _, stock_argmax, stock_self_cond, stock_done = model._denoising_step(
            decoder_forward=capture, current_canvas=canvas, argmax_canvas=canvas, input_ids=prompt,
            decoder_position_ids=dec_positions, self_conditioning_logits=None, mask_mapping=dec_mask,
            past_key_values=cache, finished_denoising=torch.zeros(1, dtype=torch.bool), cur_step=8,
            sampler=sampler, logits_processor=schedule,
            diffusion_stopping_criteria=stopping,
        )
    logits = captured["logits"]
    ours = denoise_step(logits.clone(), temperatures=torch.tensor([temperature(0.4, 0.8, 8, 8)]),
                        entropy_bounds=torch.tensor([0.5]), **draws(1, length, vocab, 0), **buffers(logits))
    assert torch.equal(ours.argmax_canvas, stock_argmax)
    assert torch.equal(ours.accepted, sampler.accepted_token_mask)
    assert torch.equal(ours.entropy, torch.distributions.Categorical(logits=stock_self_cond).entropy())
    assert torch.allclose(ours.self_conditioning.softmax(-1), stock_self_cond.softmax(-1), rtol=0, atol=1e-7)
    stop = stop_rule(torch.empty(0, 1, length, dtype=torch.long), torch.zeros((), dtype=torch.long),
                     ours.argmax_canvas, ours.entropy, torch.tensor([0]), torch.tensor([1e9]))
    assert torch.equal(stop, stock_done)
