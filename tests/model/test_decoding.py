"""Decoding with the bridge KV cache: incremental logits equal a full forward, greedy generation equals a loop of
full forwards without a cache, and the decoding rules of docs/model.md §9."""

import pytest
import torch
from model_fixtures import left_pad, make_batch, randomize_parameters

from libra_model.config import LibraConfig
from libra_model.decoding import _sample, choose_tokens, constrain_logits
from libra_model.model import LibraForCausalLM
from libra_model.modules.cache import BridgeKVCache


def build(dtype=torch.float64, **overrides):
    torch.manual_seed(0)
    model = LibraForCausalLM(LibraConfig.tiny(**overrides), backend="torch").to(dtype).eval()
    randomize_parameters(model, std=0.3)
    return model


def prompt_batch(config, batch=3, length=24, images=None, padding=None):
    data = make_batch(config, batch, length, images=images or [[2], [8], []], padding=padding or [0, 5, 2])
    data = left_pad(data)
    data["contiguous_signal"] = data["contiguous_signal"].double()
    return data


@pytest.mark.parametrize("overrides", [{}, {"num_key_value_heads": 2}, {"use_2d_rope": True},
                                       {"vision_prediction_mode": "2d", "use_2d_rope": True}])
@pytest.mark.parametrize("chunks", [(10, 1), (7, 3)])
def test_incremental_decoding_equals_full_forward(overrides, chunks):
    model = build(**overrides)
    data = prompt_batch(model.config)
    ids, vi, mask, signal = (data[k] for k in ("input_ids", "vision_indices", "attention_mask", "contiguous_signal"))
    with torch.no_grad():
        full = model(ids, vi, mask, signal).logits  # [C, B, N, V']
        cache = BridgeKVCache(model.config.num_hidden_layers, capacity=4)  # small: exercises growing
        first, step = chunks
        start = 0
        for stop in [first, *range(first + step, ids.shape[-1], step), ids.shape[-1]]:
            if stop <= start:
                continue
            part = model(ids[..., start:stop], vi[:, start:stop], mask[:, start:stop], signal[:, start:stop],
                         past_key_values=cache)
            torch.testing.assert_close(part.logits, full[:, :, start:stop], rtol=1e-10, atol=1e-10)
            start = stop
    assert cache.length == ids.shape[-1]
    # Changing a later token leaves earlier positions unchanged (causality, §12.5).
    changed = ids.clone()
    changed[:, 2, -1] = (changed[0, 2, -1] + 1) % model.config.vocab_size
    with torch.no_grad():
        again = model(changed, vi, mask, signal).logits
    torch.testing.assert_close(again[:, :, :-1], full[:, :, :-1], rtol=0, atol=0)


def reference_generate(model, ids, vi, mask, signal, steps):
    """Greedy decoding by a full forward over the whole sequence at every step (no cache)."""
    config = model.config
    text = config.max_vision_token_length
    for _ in range(steps):
        with torch.no_grad():
            logits = model(ids, vi, mask, torch.cat([signal, signal.new_zeros(
                signal.shape[0], ids.shape[-1] - signal.shape[1], signal.shape[2])], 1)).logits[:, :, -1]
        fed = vi[:, -1]
        nxt = (fed + 1).clamp(max=text)
        logits = constrain_logits(logits.float(), fed, nxt, config)
        tokens = logits.argmax(-1)
        tokens = torch.where((nxt == text)[None], tokens[:1], tokens)
        ids = torch.cat([ids, tokens[:, :, None]], -1)
        vi = torch.cat([vi, nxt[:, None]], -1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], -1)
    return ids, vi


def test_greedy_generation_equals_full_forward_loop():
    model = build()
    data = prompt_batch(model.config)
    args = [data[k] for k in ("input_ids", "vision_indices", "attention_mask", "contiguous_signal")]
    out = model.generate(*args, max_new_tokens=8, eos_token_id=[])
    expected_ids, expected_vi = reference_generate(model, *args, steps=8)
    assert torch.equal(out.sequences, expected_ids)
    assert torch.equal(out.vision_indices, expected_vi)
    assert torch.equal(out.sequences[0, :, 24:], out.sequences[1, :, 24:])  # text rows agree (§12.17)
    assert out.new_tokens.shape == (2, 3, 8)


def image_prompt(config, batch=2):
    """<s> w w BOI: generation continues inside an image (docs/model.md §9)."""
    ids = torch.randint(3, config.vocab_size, (batch, 4))
    ids[:, 0] = config.bos_token_id
    ids = ids[None].repeat(config.vision_codebook_num, 1, 1)
    ids[:, :, -1] = config.boi_token_id
    vi = torch.full((batch, 4), config.max_vision_token_length)
    vi[:, -1] = 0
    return ids, vi


@pytest.mark.parametrize("do_sample,mode", [(False, "1d"), (True, "1d"), (True, "2d")])
def test_image_generation_bookkeeping_and_eoi_newline(do_sample, mode):
    model = build(torch.float32, vision_prediction_mode=mode)
    config = model.config
    ids, vi = image_prompt(config)
    codes = config.image_feature_resolution ** 2
    generator = torch.Generator().manual_seed(1)
    out = model.generate(ids, vi, max_new_tokens=codes + 4, do_sample=do_sample, temperature=1.5, top_p=0.9,
                         eos_token_id=[], generator=generator)
    new, new_vi = out.new_tokens, out.vision_indices[:, 4:]
    expected_vi = torch.tensor([*range(1, codes + 2), *([config.max_vision_token_length] * 3)])
    assert torch.equal(new_vi, expected_vi.expand_as(new_vi))  # §12.16
    vision = new_vi < config.max_vision_token_length
    assert (new[:, vision] >= config.vocab_size).all() and (new[:, ~vision] < config.vocab_size).all()
    assert (new[:, :, :codes] < config.boi_token_id).all()  # codes only inside the image
    assert (new[:, :, codes] == config.eoi_token_id).all()
    assert (new[:, :, codes + 1] == config.newline_token_id).all()  # §12.15: EOI -> newline, no NaN
    assert torch.equal(new[0, :, codes + 1:], new[1, :, codes + 1:])


def test_eos_stops_and_pads_every_codebook_row():
    model = build()
    data = prompt_batch(model.config)
    args = [data[k] for k in ("input_ids", "vision_indices", "attention_mask", "contiguous_signal")]
    free = model.generate(*args, max_new_tokens=6, eos_token_id=[]).new_tokens
    stop = int(free[0, 0, 2])  # the token row 0 emits third becomes the stop id
    out = model.generate(*args, max_new_tokens=6, eos_token_id=stop, pad_token_id=0).new_tokens
    for b in range(free.shape[1]):
        hits = (free[0, b] == stop).nonzero()
        end = int(hits[0]) if len(hits) else None
        if end is None:
            assert torch.equal(out[:, b], free[:, b, :out.shape[-1]])
            continue
        assert torch.equal(out[:, b, :end + 1], free[:, b, :end + 1])
        assert (out[:, b, end] == stop).all()  # every codebook row gets the stop id (§11.7 fixed)
        assert (out[:, b, end + 1:] == 0).all()
    # Stops early when every row has finished.
    assert out.shape[-1] <= 6


def test_sampling_is_reproducible_and_top_p_filters():
    model = build(torch.float32)
    data = prompt_batch(model.config)
    args = [data[k].float() if k == "contiguous_signal" else data[k]
            for k in ("input_ids", "vision_indices", "attention_mask", "contiguous_signal")]
    runs = [model.generate(*args, max_new_tokens=5, do_sample=True, temperature=0.8, top_p=0.95, eos_token_id=[],
                           generator=torch.Generator().manual_seed(7)).sequences for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    greedy = model.generate(*args, max_new_tokens=5, eos_token_id=[]).sequences
    tiny_p = model.generate(*args, max_new_tokens=5, do_sample=True, top_p=1e-6, eos_token_id=[],
                            generator=torch.Generator().manual_seed(3)).sequences
    assert torch.equal(tiny_p, greedy)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(4000, 4)
    draws = _sample(logits, 1.0, 0.7, torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == {0, 1}
    assert abs((draws == 0).float().mean().item() - 0.5 / 0.8) < 0.03


def test_choose_tokens_copies_text_choice_across_codebooks():
    logits = torch.randn(2, 3, 10)
    next_is_text = torch.tensor([True, False, True])
    tokens = choose_tokens(logits, next_is_text, do_sample=True, temperature=1.0, top_p=1.0,
                           generator=torch.Generator().manual_seed(0))
    assert torch.equal(tokens[0, next_is_text], tokens[1, next_is_text])


def test_generate_rejects_bad_arguments():
    model = build(torch.float32)
    data = make_batch(model.config, 2, 16, padding=[0, 3])  # right padding
    args = [data[k] for k in ("input_ids", "vision_indices", "attention_mask")]
    with pytest.raises(ValueError, match="left-padded"):
        model.generate(*args)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(args[0], args[1], max_new_tokens=-1)
    with pytest.raises(ValueError, match="top_p"):
        model.generate(args[0], args[1], top_p=0.0)
