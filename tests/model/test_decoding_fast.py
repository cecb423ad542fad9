"""The fast decoding paths: the static text cache and the compiled decode step give the eager path's greedy tokens,
a compiled step compiles once; beam search's scores are the model's log-probabilities; top-k, repetition penalty,
stop strings."""

import pytest
import torch
from model_fixtures import left_pad, make_batch, randomize_parameters

from libra_model.config import LibraConfig
from libra_model.decoding import (
    _beam_search,
    _Decoder,
    _sample,
    apply_repetition_penalty,
    bucket_batch,
    bucket_length,
)
from libra_model.model import LibraForCausalLM

KEYS = ("input_ids", "vision_indices", "attention_mask", "contiguous_signal")


def build(dtype=torch.float64, **overrides):
    torch.manual_seed(0)
    model = LibraForCausalLM(LibraConfig.tiny(**overrides), backend="torch").to(dtype).eval()
    randomize_parameters(model, std=0.3)
    return model


def prompts(config, images, padding, length=24, seed=0):
    """A left-padded batch; with images=[[2], [13], []] and padding=[0, 2, 3] row 1's prompt ends inside its image
    (codes 0..8 of 11 positions) and row 2 is text only."""
    data = left_pad(make_batch(config, len(images), length, images=images, padding=padding,
                               generator=torch.Generator().manual_seed(seed)))
    data["contiguous_signal"] = data["contiguous_signal"].double()
    return [data[k] for k in KEYS]


def image_prompt(config, batch=2):
    """<s> w w BOI for every row: the whole generation starts inside an image (all vision, then text)."""
    ids = torch.randint(3, config.vocab_size, (batch, 4), generator=torch.Generator().manual_seed(5))
    ids[:, 0], ids[:, -1] = config.bos_token_id, config.boi_token_id
    ids = ids[None].repeat(config.vision_codebook_num, 1, 1)
    vi = torch.full((batch, 4), config.max_vision_token_length)
    vi[:, -1] = 0
    return [ids, vi, None, None]


MIXES = {"image, inside an image, text": ([[2], [13], []], [0, 2, 3]), "all text": ([[], [], []], [0, 4, 1])}


@pytest.mark.parametrize("overrides,mix", [
    ({}, "image, inside an image, text"), ({}, "all text"),
    ({"num_key_value_heads": 2}, "image, inside an image, text"),
    ({"use_2d_rope": True}, "image, inside an image, text"),
    ({"vision_prediction_mode": "2d", "use_2d_rope": True}, "image, inside an image, text")])
def test_static_cache_greedy_equals_dynamic(overrides, mix):
    model = build(**overrides)
    args = prompts(model.config, *MIXES[mix])
    eager = model.generate(*args, max_new_tokens=9, eos_token_id=[])
    static = model.generate(*args, max_new_tokens=9, eos_token_id=[], cache="static")
    assert torch.equal(static.sequences, eager.sequences)
    assert torch.equal(static.vision_indices, eager.vision_indices)
    assert torch.equal(static.attention_mask, eager.attention_mask)
    # Per-row EOS: a token that some rows emit stops them and pads them in both paths alike.
    stop = int(eager.new_tokens[0, 0, 3])
    eager = model.generate(*args, max_new_tokens=9, eos_token_id=stop)
    static = model.generate(*args, max_new_tokens=9, eos_token_id=stop, cache="static")
    assert torch.equal(static.sequences, eager.sequences)
    assert (static.new_tokens[:, 0, 3] == stop).all() and (static.new_tokens[:, 0, 4:] == 0).all()


@pytest.mark.parametrize("mode", ["1d", "2d"])
def test_static_cache_after_generating_an_image(mode):
    # Vision steps run on the general cache, which becomes the static one when every row has reached text.
    model = build(vision_prediction_mode=mode)
    args = image_prompt(model.config)
    steps = model.config.image_feature_resolution ** 2 + 6
    eager = model.generate(*args, max_new_tokens=steps, eos_token_id=[])
    static = model.generate(*args, max_new_tokens=steps, eos_token_id=[], cache="static")
    assert torch.equal(static.sequences, eager.sequences)
    assert (static.vision_indices[:, -4:] == model.config.max_vision_token_length).all()


def test_compiled_greedy_equals_eager_and_compiles_once():
    from torch._dynamo.utils import counters

    model = build()
    args = prompts(model.config, *MIXES["image, inside an image, text"])  # batch 3: bucket 4, one inert row
    eager = model.generate(*args, max_new_tokens=7, eos_token_id=[])
    torch._dynamo.reset()
    counters.clear()
    compiled = model.generate(*args, max_new_tokens=7, eos_token_id=[], cache="static", compile=True)
    assert torch.equal(compiled.sequences, eager.sequences)
    assert counters["stats"]["unique_graphs"] == 1  # one graph for every step of the call
    assert not counters["graph_break"]
    # Another batch of the same shapes, and a length in the same bucket: nothing new is compiled.
    again = prompts(model.config, [[5], [], [12]], [1, 0, 2], seed=3)
    expected = model.generate(*again, max_new_tokens=5, eos_token_id=[])
    out = model.generate(*again, max_new_tokens=5, eos_token_id=[], cache="static", compile=True)
    assert torch.equal(out.sequences, expected.sequences)
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"]


def test_buckets():
    assert [bucket_batch(b) for b in (1, 2, 3, 8, 9, 32)] == [1, 2, 4, 8, 16, 32]
    assert [bucket_length(n) for n in (1, 256, 257, 700)] == [256, 256, 512, 768]


# ------------------------------------------------------------------------------------------------ beam search
def sequence_log_probs(model, out, length_penalty, eos, signal):
    """Recompute each row's score with one forward over the returned sequence (the prompt's signal ``signal``
    [B, N, cs], none for the generated tokens): the summed log-probabilities of the generated tokens up to and
    including the first EOS, over that length ** length_penalty."""
    n = out.num_prompt_tokens
    signal = torch.cat([signal, signal.new_zeros(signal.shape[0], out.sequences.shape[-1] - n, signal.shape[-1])], 1)
    with torch.no_grad():
        logits = model(out.sequences, out.vision_indices, out.attention_mask, signal).logits[0].double()
    log_probs = torch.log_softmax(logits[:, n - 1:-1], dim=-1)
    new = out.new_tokens[0]
    token_lp = log_probs.gather(-1, new[..., None]).squeeze(-1)  # [B, T]
    scores = []
    for b in range(new.shape[0]):
        hits = [t for t, token in enumerate(new[b].tolist()) if token in eos]
        size = hits[0] + 1 if hits else new.shape[1]
        scores.append(float(token_lp[b, :size].sum()) / size ** length_penalty)
    return torch.tensor(scores, dtype=torch.float64)


def run_beams(model, args, num_beams, *, cache="dynamic", length_penalty=1.0, max_new_tokens=8, eos=(2,)):
    """Beam search through the library's own function (generate sends num_beams=1 to greedy decoding)."""
    input_ids, vision_indices, attention_mask, signal = args
    batch, length = vision_indices.shape
    if attention_mask is None:
        attention_mask = torch.ones(batch, length, dtype=torch.long)
    decoder = _Decoder(model, cache, False, batch * num_beams, length + max_new_tokens)
    with torch.no_grad():
        return _beam_search(decoder, (input_ids, vision_indices.long(), attention_mask.long()), signal,
                            num_beams=num_beams, length_penalty=length_penalty, max_new_tokens=max_new_tokens,
                            eos=list(eos), pad=model.config.pad_token_id)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_one_beam_equals_greedy(cache):
    model = build()
    args = prompts(model.config, [[2], [], [6]], [0, 4, 1])
    free = model.generate(*args, max_new_tokens=8, eos_token_id=[])
    stop = int(free.new_tokens[0, 1, 2])  # row 1 stops at its third token
    greedy = model.generate(*args, max_new_tokens=8, eos_token_id=stop)
    beams = run_beams(model, args, 1, cache=cache, eos=(stop,))
    assert torch.equal(beams.sequences, greedy.sequences)
    torch.testing.assert_close(beams.sequences_scores.double(), sequence_log_probs(model, beams, 1.0, [stop], args[3]),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("length_penalty", [0.0, 1.0, 2.5])
def test_beam_scores_are_the_recomputed_log_probs(length_penalty):
    model = build()
    args = prompts(model.config, [[2], [], [6]], [0, 4, 1])
    free = model.generate(*args, max_new_tokens=8, eos_token_id=[])
    eos = [int(free.new_tokens[0, 0, 1]), int(free.new_tokens[0, 2, 4])]  # ids the model is likely to reach
    out = model.generate(*args, max_new_tokens=8, num_beams=3, length_penalty=length_penalty, eos_token_id=eos)
    assert out.sequences_scores.shape == (3,)
    recomputed = sequence_log_probs(model, out, length_penalty, eos, args[3])
    torch.testing.assert_close(out.sequences_scores.double(), recomputed, rtol=1e-5, atol=1e-5)
    static = model.generate(*args, max_new_tokens=8, num_beams=3, length_penalty=length_penalty,
                            eos_token_id=eos, cache="static")
    assert torch.equal(static.sequences, out.sequences)  # the static cache reorders like the general one
    torch.testing.assert_close(static.sequences_scores, out.sequences_scores)


def test_best_beam_is_at_least_greedy_and_exact_with_full_width():
    model = build()
    config = model.config
    args = prompts(config, [[2], [], [6]], [0, 4, 1])
    greedy = model.generate(*args, max_new_tokens=6, eos_token_id=[])
    greedy_lp = sequence_log_probs(model, greedy, 0.0, [], args[3])
    beams = model.generate(*args, max_new_tokens=6, num_beams=4, length_penalty=0.0, eos_token_id=[])
    assert (beams.sequences_scores.double() >= greedy_lp - 1e-6).all()
    # With num_beams = V and two steps the search is exhaustive: compare with the best of all V² continuations.
    vocab = config.vocab_size
    exact = model.generate(*args, max_new_tokens=2, num_beams=vocab, length_penalty=0.0, eos_token_id=[])
    ids, vi, mask, signal = args
    batch, length = vi.shape
    first = torch.arange(vocab).repeat(batch)  # [B·V]: every first token for every row
    rows = torch.arange(batch).repeat_interleave(vocab)
    ids1 = torch.cat([ids[:, rows], first.expand(config.vision_codebook_num, -1)[:, :, None]], -1)
    vi1 = torch.cat([vi[rows], torch.full((batch * vocab, 1), config.max_vision_token_length)], -1)
    mask1 = torch.cat([mask[rows], torch.ones(batch * vocab, 1, dtype=mask.dtype)], -1)
    signal1 = torch.cat([signal[rows], signal.new_zeros(batch * vocab, 1, signal.shape[-1])], 1)
    with torch.no_grad():
        logits = model(ids1, vi1, mask1, signal1).logits[0].double()
    lp = torch.log_softmax(logits, -1)
    best = (lp[:, -2].gather(-1, first[:, None]).squeeze(-1) + lp[:, -1, :vocab].max(-1).values).view(batch, vocab)
    torch.testing.assert_close(exact.sequences_scores.double(), best.max(-1).values, rtol=1e-5, atol=1e-5)


def test_beam_search_rejects_what_it_cannot_do():
    model = build(torch.float32)
    args = image_prompt(model.config)
    with pytest.raises(ValueError, match="inside an image"):
        model.generate(*args, num_beams=2)
    text = prompts(model.config, [[], []], [0, 1])
    with pytest.raises(ValueError, match="do_sample"):
        model.generate(*text, num_beams=2, do_sample=True)
    with pytest.raises(ValueError, match="repetition_penalty"):
        model.generate(*text, num_beams=2, repetition_penalty=1.3)
    with pytest.raises(ValueError, match="cache='static'"):
        model.generate(*text, compile=True)
    with pytest.raises(ValueError, match="cache must be"):
        model.generate(*text, cache="paged")
    with pytest.raises(ValueError, match="tokenizer"):
        model.generate(*text, stop_strings=["x"])
    with pytest.raises(ValueError, match="top_k"):
        model.generate(*text, top_k=-1)


# ------------------------------------------------------------------------------------------------ sampling rules
def test_top_k_keeps_the_k_best():
    logits = torch.log(torch.tensor([[0.1, 0.4, 0.3, 0.2]])).expand(6000, 4)
    draws = _sample(logits, 1.0, 1.0, torch.Generator().manual_seed(0), top_k=2)
    assert set(draws.tolist()) == {1, 2}
    assert abs((draws == 1).float().mean().item() - 0.4 / 0.7) < 0.03


def test_repetition_penalty_matches_the_definition():
    torch.manual_seed(1)
    logits = torch.randn(3, 10)
    previous = torch.tensor([[1, 1, 4, 12], [0, -1, 9, 9], [7, 3, 3, 5]])  # 12 and -1: outside, ignored
    out = apply_repetition_penalty(logits, previous, 1.7)
    expected = logits.clone()
    for r in range(3):
        for token in set(previous[r].tolist()):
            if 0 <= token < 10:
                value = logits[r, token]
                expected[r, token] = value / 1.7 if value > 0 else value * 1.7
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_repetition_penalty_in_generation(cache):
    model = build()
    args = prompts(model.config, *MIXES["image, inside an image, text"])
    plain = model.generate(*args, max_new_tokens=8, eos_token_id=[], cache=cache)
    penalized = model.generate(*args, max_new_tokens=8, eos_token_id=[], repetition_penalty=50.0, cache=cache)
    reference = model.generate(*args, max_new_tokens=8, eos_token_id=[], repetition_penalty=50.0)
    assert torch.equal(penalized.sequences, reference.sequences)
    assert not torch.equal(penalized.sequences, plain.sequences)


class SpaceTokenizer:
    """decode(ids) -> the ids written out, space separated (enough to test stop strings)."""

    def decode(self, ids):
        return " ".join(str(int(i)) for i in ids)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_stop_strings_finish_rows(cache):
    model = build()
    args = prompts(model.config, *MIXES["all text"])
    free = model.generate(*args, max_new_tokens=8, eos_token_id=[]).new_tokens[0]
    stop = f"{int(free[0, 2])} {int(free[0, 3])}"  # row 0 finishes at its fourth token
    out = model.generate(*args, max_new_tokens=8, eos_token_id=[], stop_strings=stop, tokenizer=SpaceTokenizer(),
                         pad_token_id=0, cache=cache).new_tokens
    for b in range(free.shape[0]):
        texts = [SpaceTokenizer().decode(free[b, :t + 1]) for t in range(free.shape[1])]
        hits = [t for t, text in enumerate(texts) if stop in text]
        end = hits[0] if hits else free.shape[1] - 1
        assert torch.equal(out[0, b, :end + 1], free[b, :end + 1])
        assert (out[:, b, end + 1:] == 0).all()
    assert out.shape[-1] >= 4
