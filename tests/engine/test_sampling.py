"""The fast denoising step decides exactly what the stock step decides, and samples the same distribution."""

from __future__ import annotations

import torch
from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
    EntropyBoundSampler,
    EntropyBoundSamplerConfig,
    LinearTemperatureScheduleLogitsProcessor,
    StableAndConfidentStoppingCriteria,
)

from dgemma_worker.model import LoadedModel
from dgemma_worker.sampling import (
    StabilityTracker,
    acceptance_mask,
    denoise_step,
    distribution,
    temperature,
)


def random_logits(seed: int, batch: int = 2, length: int = 64, vocab: int = 500, scale: float = 4.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.tanh(torch.randn(batch, length, vocab, generator=g) * scale / 30) * 30


def test_entropy_and_probabilities_are_the_categorical_ones() -> None:
    for seed in range(5):
        logits = random_logits(seed, scale=1.0 + 10 * seed) / 0.6
        dist = distribution(logits)
        stock = torch.distributions.Categorical(logits=logits)
        assert torch.allclose(dist.entropy, stock.entropy(), rtol=0, atol=1e-4)
        assert torch.allclose(dist.probs(), stock.probs, rtol=1e-5, atol=1e-7)


def test_acceptance_matches_the_stock_sampler_on_the_same_logits() -> None:
    for seed in range(8):
        logits = random_logits(seed, scale=2.0 + seed)
        for bound in (0.01, 0.1, 1.0, 10.0):
            sampler = EntropyBoundSampler(EntropyBoundSamplerConfig(entropy_bound=bound), 64, 500, 48)
            current = torch.zeros(2, 64, dtype=torch.long)
            sampler.accept_canvas(current, current + 1, logits, cur_step=3)
            entropy = distribution(logits).entropy
            assert torch.equal(acceptance_mask(entropy, bound), sampler.accepted_token_mask)
            assert int(acceptance_mask(entropy, bound).sum(-1).min()) >= 1


def test_temperature_schedule_matches_the_stock_processor() -> None:
    logits = random_logits(1)
    for cur_step in (48, 30, 1):
        stock = LinearTemperatureScheduleLogitsProcessor(0.4, 0.8, 48)(None, logits, cur_step)  # type: ignore[arg-type]
        assert torch.equal(logits / torch.tensor([temperature(0.4, 0.8, cur_step, 48)]), stock)


def test_stopping_matches_the_stock_criteria_step_by_step() -> None:
    for k in (0, 1, 2):
        stock = StableAndConfidentStoppingCriteria(stability_threshold=k, confidence_threshold=2.0)
        ours = StabilityTracker(k, 2.0)
        g = torch.Generator().manual_seed(k)
        for step in range(10):
            sharp = random_logits(step, batch=1, scale=40.0 if step > 4 else 1.0)
            argmax = sharp.argmax(-1) if step % 3 else torch.randint(0, 500, (1, 64), generator=g)
            entropy = distribution(sharp).entropy
            assert ours.update(argmax[0], entropy[0]) == bool(stock(argmax, sharp)[0]), (k, step)


def test_the_fast_step_decides_like_the_stock_step_of_the_real_model(loaded: LoadedModel) -> None:
    """Run transformers' own `_denoising_step` on the tiny model and replay its logits through ours."""
    model = loaded.model
    length, vocab = loaded.canvas_length, loaded.vocab_size
    prompt = torch.tensor([[2, 40, 41, 42, 43]])
    cache = model._prepare_cache_for_generation(model.generation_config, batch_size=1, max_length=64)
    positions = torch.arange(0, 5, dtype=torch.int32).unsqueeze(0)
    with torch.inference_mode():
        ids, mask = model._prepare_encoder_inputs(
            input_ids=prompt,
            attention_mask=torch.ones(1, 5, dtype=torch.bool),
            encoder_position_ids=positions,
            past_key_values=cache,
            is_prefill=True,
            canvas_length=length,
            batch_size=1,
        )
        model.model.encoder(input_ids=ids, attention_mask=mask, past_key_values=cache, position_ids=positions)
        canvas = torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(5))
        dec_mask = model.model.decoder.create_diffusion_decoder_attention_mask(
            config=model.config,
            inputs_embeds=canvas.unsqueeze(-1),
            past_key_values=cache,
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
        processor = LinearTemperatureScheduleLogitsProcessor(0.4, 0.8, 8)
        from transformers import LogitsProcessorList

        _, stock_argmax, stock_self_cond, _ = model._denoising_step(
            decoder_forward=capture,
            current_canvas=canvas,
            argmax_canvas=canvas,
            input_ids=prompt,
            decoder_position_ids=dec_positions,
            self_conditioning_logits=None,
            mask_mapping=dec_mask,
            past_key_values=cache,
            finished_denoising=torch.zeros(1, dtype=torch.bool),
            cur_step=8,
            sampler=sampler,
            logits_processor=LogitsProcessorList([processor]),
            diffusion_stopping_criteria=None,
        )
    ours = denoise_step(
        captured["logits"],
        canvas,
        temperatures=torch.tensor([temperature(0.4, 0.8, 8, 8)]),
        entropy_bounds=torch.tensor([0.5]),
        vocab_size=vocab,
        generators=[torch.Generator().manual_seed(0)],
    )
    assert torch.equal(ours.argmax_canvas, stock_argmax)
    assert torch.equal(ours.accepted, sampler.accepted_token_mask)
    assert torch.equal(ours.processed_logits, stock_self_cond)


def test_accepted_positions_are_sampled_from_the_model_distribution() -> None:
    """Empirical frequencies of sampled tokens match softmax(logits / t) within sampling error."""
    vocab, n = 6, 4000
    logits = torch.tensor([[[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]]])
    expected = torch.softmax(logits[0, 0] / 0.5, -1)
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(vocab)
    for _ in range(n):
        step = denoise_step(
            logits,
            torch.zeros(1, 1, dtype=torch.long),
            temperatures=torch.tensor([0.5]),
            entropy_bounds=torch.tensor([100.0]),
            vocab_size=vocab,
            generators=[g],
        )
        assert bool(step.accepted.all())
        counts[step.next_canvas[0, 0]] += 1
    observed = counts / n
    # Four standard errors per category: fails on a wrong distribution, not on noise.
    tolerance = 4 * torch.sqrt(expected * (1 - expected) / n) + 1e-3
    assert bool(((observed - expected).abs() <= tolerance).all()), (observed, expected)


def test_rejected_positions_are_renoised_uniformly_and_accepted_ones_kept_from_the_sample() -> None:
    vocab = 50
    sharp = torch.full((1, 8, vocab), -30.0)
    sharp[0, :, 7] = 30.0  # a certain token everywhere: entropy ~0
    sharp[0, 4:, :] = 0.0  # uniform (max entropy) on the second half
    g = torch.Generator().manual_seed(1)
    seen: set[int] = set()
    for _ in range(50):
        step = denoise_step(
            sharp,
            torch.zeros(1, 8, dtype=torch.long),
            temperatures=torch.tensor([1.0]),
            entropy_bounds=torch.tensor([0.1]),
            vocab_size=vocab,
            generators=[g],
        )
        # The bound excludes the largest entropy, so exactly one high-entropy position rides along.
        assert step.accepted[0, :4].all() and int(step.accepted[0, 4:].sum()) == 1
        assert (step.next_canvas[0, :4] == 7).all()
        seen.update(step.next_canvas[0][~step.accepted[0]].tolist())
    assert len(seen) > 40  # uniform noise over the vocabulary


def test_each_row_uses_only_its_own_generator() -> None:
    logits = random_logits(3, batch=2)
    canvas = torch.zeros(2, 64, dtype=torch.long)

    def run(seed_a: int, seed_b: int) -> torch.Tensor:
        gens: list[torch.Generator | None] = [
            torch.Generator().manual_seed(seed_a),
            torch.Generator().manual_seed(seed_b),
        ]
        return denoise_step(
            logits, canvas, temperatures=torch.tensor([0.7, 0.7]), entropy_bounds=torch.tensor([0.5, 0.5]),
            vocab_size=500, generators=gens,
        ).next_canvas

    first, second = run(1, 2), run(1, 99)
    assert torch.equal(first[0], second[0])
    assert not torch.equal(first[1], second[1])


def test_the_in_place_step_decides_the_same_and_conditions_the_model_the_same() -> None:
    """overwrite_logits + scratch (the engine's path) vs the copying path, on the same logits."""
    for seed in range(4):
        logits = random_logits(seed, batch=2, scale=3.0 + seed)
        canvas = torch.zeros(2, 64, dtype=torch.long)
        kwargs = {"temperatures": torch.tensor([0.6, 0.9]), "entropy_bounds": torch.tensor([0.3, 1.0]),
                  "vocab_size": 500}
        copying = denoise_step(logits, canvas, generators=[torch.Generator().manual_seed(1)] * 2, **kwargs)
        scratch = torch.empty_like(logits)
        fresh = logits.clone()
        in_place = denoise_step(fresh, canvas, generators=[torch.Generator().manual_seed(1)] * 2,
                                overwrite_logits=True, scratch=scratch, **kwargs)
        assert torch.equal(in_place.argmax_canvas, copying.argmax_canvas)
        assert torch.equal(in_place.accepted, copying.accepted)
        assert torch.equal(in_place.entropy, copying.entropy)
        assert torch.equal(in_place.next_canvas, copying.next_canvas)
        assert in_place.processed_logits.data_ptr() == fresh.data_ptr()  # no copy was made
        # The decoder only takes softmax(self-conditioning logits): a shift by the maximum changes nothing.
        assert torch.allclose(in_place.processed_logits.softmax(-1), copying.processed_logits.softmax(-1),
                              rtol=0, atol=1e-7)
