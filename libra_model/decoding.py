"""Batched decoding for Libra (docs/model.md): greedy, sampling and beam search, with the general
bridge KV cache or the static text cache and an optionally compiled decode step.

Decoding rules, without the reference's decoding bugs: EOS is written to every codebook row at the step it
appears, a text token is drawn once and copied to all codebook rows (codebook rows are drawn independently only at
vision positions), EOI→newline forcing uses a large finite logit so sampling cannot produce NaN, and beam search
reorders the bridge cache (the reference cannot).

Vision-index bookkeeping: the next token's index is the previous one + 1, clipped to max_vision_token_length (text).
An image can thus only be generated after a prompt ending in BOI; it runs through the codes, then EOI, then text.
Within an image the codes never take the BOI/EOI ids and the slot at index R²+1 is always EOI, so a generated image
is always well formed (the reference leaves this to the model).

Caches: ``cache="dynamic"`` (default) runs every step through the model's forward with the general
:class:`~libra_model.modules.cache.BridgeKVCache`. ``cache="static"`` decodes text tokens with
:func:`text_decode_step` on a preallocated :class:`~libra_model.modules.cache.StaticBridgeKVCache` (one K and one V
per layer, plain attention); steps that feed vision tokens (a prompt ending inside an image) still use the general
cache, which is converted once every row has reached text. ``compile=True`` (static cache only) runs the decode
step under ``torch.compile(mode="reduce-overhead", fullgraph=True)`` (CUDA graphs on a GPU) with the batch and the
cache length rounded up to buckets, so a step never recompiles and later calls with the same buckets reuse it.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from libra_kernels import ModalityLayout
from libra_model.modules.attention import AttentionContext
from libra_model.modules.cache import BridgeKVCache, StaticBridgeKVCache
from libra_model.modules.rope import rotary_cos_sin

FORCED_LOGIT = 1.0e4  # finite, so softmax over [FORCED_LOGIT, -inf, ...] is one-hot, never NaN
CACHES = ("dynamic", "static")
LENGTH_BUCKET = 256  # compiled decoding: the static cache's capacity is a multiple of this
COMPILE_OPTIONS = dict(mode="reduce-overhead", fullgraph=True, dynamic=False)


@dataclass
class GenerationOutput:
    """sequences: int64 [C, B, N + T] (prompt then T generated tokens, pad after EOS); vision_indices: int64
    [B, N + T]; attention_mask: int64 [B, N + T] (0 at left padding); num_prompt_tokens: N; sequences_scores:
    float32 [B] with beam search (the returned hypothesis' summed log-probabilities / its generated length **
    length_penalty), else None."""

    sequences: torch.Tensor
    vision_indices: torch.Tensor
    attention_mask: torch.Tensor
    num_prompt_tokens: int
    sequences_scores: torch.Tensor | None = None

    @property
    def new_tokens(self) -> torch.Tensor:
        """int64 [C, B, T]: the generated part of ``sequences``."""
        return self.sequences[:, :, self.num_prompt_tokens:]


# ---------------------------------------------------------------------------------------------- logits rules
def _force(logits: torch.Tensor, rows: torch.Tensor, token_id: int) -> torch.Tensor:
    """Where ``rows`` [B] is True, make ``token_id`` the only choice in every codebook row of logits [C, B, V']."""
    forced = torch.full_like(logits, float("-inf"))
    forced[..., token_id] = FORCED_LOGIT
    return torch.where(rows[None, :, None], forced, logits)


def constrain_logits(logits: torch.Tensor, fed_index: torch.Tensor, next_index: torch.Tensor, config) -> torch.Tensor:
    """Apply Libra's decoding rules to the last-position logits [C, B, V + Vv] (float).

    fed_index / next_index: int64 [B], the vision index of the token just fed and of the token to choose.
    After EOI the next token is the newline id; inside an image codes cannot be BOI/EOI and the EOI slot is EOI.
    """
    codes = config.image_feature_resolution ** 2
    logits = _force(logits, fed_index == config.eoi_vision_index, config.newline_token_id)
    is_code = (next_index >= 1) & (next_index <= codes)
    frame = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    frame[[config.boi_token_id, config.eoi_token_id]] = True
    logits = logits.masked_fill(is_code[None, :, None] & frame, float("-inf"))
    return _force(logits, next_index == config.eoi_vision_index, config.eoi_token_id)


def apply_repetition_penalty(logits: torch.Tensor, previous: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' repetition penalty: logits [R, W] of ids seen in ``previous`` (int64 [R, L]; ids outside
    [0, W) are ignored) are divided by ``penalty`` when positive and multiplied by it when negative."""
    width = logits.shape[-1]
    ids = torch.where((previous >= 0) & (previous < width), previous, width)
    seen = torch.zeros(logits.shape[0], width + 1, dtype=torch.bool, device=logits.device)
    seen.scatter_(1, ids, True)
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen[:, :width], penalized, logits)


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None,
            top_k: int = 0) -> torch.Tensor:
    """One draw per row of logits [R, V'] (float32) with temperature, top-k and nucleus (top-p) filtering."""
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Drop a token when the tokens ranked above it already hold top_p; the first token always stays.
        drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def choose_tokens(logits: torch.Tensor, next_is_text: torch.Tensor, *, do_sample: bool, temperature: float,
                  top_p: float, top_k: int = 0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next ids int64 [C, B] from logits [C, B, W]: greedy (argmax) or sampled; at text positions
    (``next_is_text`` [B]) the row-0 choice is copied to every codebook row."""
    codebooks, batch, width = logits.shape
    if do_sample and temperature > 0:
        tokens = _sample(logits.reshape(codebooks * batch, width), temperature, top_p, generator, top_k)
        tokens = tokens.view(codebooks, batch)
    else:
        tokens = logits.argmax(-1)
    return torch.where(next_is_text[None], tokens[:1], tokens)


# ---------------------------------------------------------------------------------------------- static decoding
def bucket_batch(batch: int) -> int:
    """The compiled step's batch for ``batch`` rows: the next power of two."""
    return 1 << max(batch - 1, 0).bit_length()


def bucket_length(length: int) -> int:
    """The compiled step's cache capacity for ``length`` positions: the next multiple of LENGTH_BUCKET."""
    return -(-length // LENGTH_BUCKET) * LENGTH_BUCKET


def compiled_decoding_available(device: torch.device | str) -> bool:
    """Whether ``generate(..., cache="static", compile=True)`` pays off on ``device``: a CUDA device with Triton
    (CUDA graphs). On the CPU compilation works but costs more than it saves for one generation call."""
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def text_decode_step(model, cache: StaticBridgeKVCache, tokens: torch.Tensor, positions: torch.Tensor,
                     slot: torch.Tensor) -> torch.Tensor:
    """One text decoding step on the static cache, with fixed shapes (the function ``compile=True`` compiles).

    Args:
        model: a LibraForCausalLM in eval mode. cache: filled up to ``slot`` (its batch is B).
        tokens: int64 [B] text ids to feed. positions: int64 [B] their RoPE positions. slot: int64 [] the cache
            slot they are written to (the cache length), on the model's device.
    Returns:
        float32 [B, V]: the text head's logits of the next token.
    """
    config = model.config
    batch = tokens.shape[0]
    rows = torch.arange(batch, device=tokens.device)
    layout = ModalityLayout(batch, 0, rows, rows.view(batch, 1),
                            torch.zeros(batch, 1, dtype=torch.bool, device=tokens.device), "torch")
    # A text token has equal row and column components under 2d RoPE, so the 1d table serves both modes.
    cos = cache.rope_cos.index_select(0, positions)[:, None, None]
    sin = cache.rope_sin.index_select(0, positions)[:, None, None]
    cache.open_slot(slot)
    ctx = AttentionContext(layout, cos, sin, layout.vision_mask, None, cache, decode_slot=slot)
    ids = tokens.view(1, batch, 1).expand(config.vision_codebook_num, batch, 1)
    hidden = model.model(ids, layout, ctx)
    return model._text_logits(hidden).float()


_compiled_step = None
_STATIC_CACHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _compiled_text_decode_step():
    global _compiled_step
    if _compiled_step is None:
        _compiled_step = torch.compile(text_decode_step, **COMPILE_OPTIONS)
    return _compiled_step


def static_cache(model, batch_size: int, capacity: int) -> StaticBridgeKVCache:
    """The model's static cache of these dimensions, reset: reused between calls (a compiled step and its CUDA
    graphs keep working on the same buffers), reallocated when the dimensions change (one per model is kept;
    :func:`free_static_cache` releases it)."""
    config = model.config
    attention = model.model.layers[0].self_attn
    heads = attention.k_proj.weight.shape[0] // config.head_dim  # the local kv heads of a TP shard
    weight = model.model.embed_tokens.weight
    dims = (config.num_hidden_layers, batch_size, capacity, heads, config.head_dim, weight.dtype, weight.device)
    cache = _STATIC_CACHES.get(model)
    if cache is None or not cache.matches(*dims):
        _STATIC_CACHES.pop(model, None)
        cache = StaticBridgeKVCache(*dims[:5], dtype=weight.dtype, device=weight.device)
        positions = torch.arange(capacity, device=weight.device)[None]
        cos, sin = rotary_cos_sin(positions, config.head_dim, config.rope_theta, weight.dtype)
        cache.set_rope(cos[0, :, 0].contiguous(), sin[0, :, 0].contiguous())
        _STATIC_CACHES[model] = cache
    cache.reset()
    return cache


def free_static_cache(model) -> None:
    """Release the static cache kept for ``model`` (if any)."""
    _STATIC_CACHES.pop(model, None)


class _Decoder:
    """Feeds tokens to the model and returns the next logits, on the general cache or the static one.

    ``prefill`` returns float logits [C, b, V + Vv]; ``step`` returns them for a general-cache step and float32
    [1, rows, V] (the text head only) for a static text step; ``reorder`` reorders or expands the cached rows.
    """

    def __init__(self, model, cache: str, compile: bool, rows: int, capacity: int):
        self.model, self.config = model, model.config
        self.use_static, self.compile = cache == "static", compile
        self.rows = rows
        self.batch = bucket_batch(rows) if compile else rows
        self.capacity = bucket_length(capacity) if compile else capacity
        self.step_fn = _compiled_text_decode_step() if compile else text_decode_step
        self.general: BridgeKVCache | None = None
        self.static: StaticBridgeKVCache | None = None
        self.slot: torch.Tensor | None = None

    def prefill(self, input_ids, vision_indices, attention_mask, contiguous_signal) -> torch.Tensor:
        model, config = self.model, self.config
        # A prompt ending at BOI or inside an image feeds vision tokens first: those steps need the general cache.
        needs_vision = bool((vision_indices[:, -1] < config.eoi_vision_index).any())
        if self.use_static and not needs_vision:
            cache = self.static = static_cache(model, self.batch, self.capacity)
        else:
            cache = self.general = BridgeKVCache(config.num_hidden_layers, capacity=self.capacity)
        out = model(input_ids, vision_indices, attention_mask, contiguous_signal, return_logits=False,
                    past_key_values=cache)
        return model.last_logits(out.head_inputs, out.layout).float()

    def reorder(self, index: torch.Tensor) -> None:
        (self.general or self.static).reorder(index)
        self.rows = index.shape[0]

    def step(self, tokens: torch.Tensor, next_index: torch.Tensor) -> torch.Tensor:
        """Feed tokens int64 [C, rows] with vision indices next_index int64 [rows]."""
        model, config = self.model, self.config
        text = config.max_vision_token_length
        if self.general is not None and self.use_static and bool((next_index == text).all()):
            self.static = static_cache(model, self.batch, self.capacity)
            self.static.fill_from(self.general)
            self.general = None
        if self.general is not None:
            ones = torch.ones(tokens.shape[1], 1, dtype=torch.long, device=tokens.device)
            out = model(tokens[:, :, None], next_index[:, None], ones, None, return_logits=False,
                        past_key_values=self.general)
            return model.last_logits(out.head_inputs, out.layout).float()
        cache = self.static
        if cache.length >= cache.capacity:
            raise ValueError(f"generate: the static cache of {cache.capacity} positions is full")
        if self.slot is None:
            self.slot = torch.tensor(cache.length, device=tokens.device)
        ids = tokens[0]
        if self.batch > self.rows:  # the bucket's extra rows are inert: fed padding, their logits dropped
            ids = torch.cat([ids, ids.new_full((self.batch - self.rows,), config.pad_token_id)])
        if self.compile:
            # A CUDA-graph replay reuses its output buffer: start a new step and copy the logits out of it.
            torch.compiler.cudagraph_mark_step_begin()
            logits = self.step_fn(model, cache, ids, cache.rope_start.clone(), self.slot).clone()
        else:
            logits = self.step_fn(model, cache, ids, cache.rope_start, self.slot)
        cache.rope_start.add_(1)
        cache.advance()
        self.slot = self.slot + 1
        return logits[None, :self.rows]


# ---------------------------------------------------------------------------------------------- entry point
def _check_arguments(max_new_tokens, do_sample, temperature, top_p, top_k, repetition_penalty, num_beams,
                     length_penalty, cache, compile, stop_strings, tokenizer) -> list[str]:
    def number(value):
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if do_sample and (not number(temperature) or temperature < 0):
        raise ValueError(f"generate: temperature must be >= 0, got {temperature!r}")
    if not number(top_p) or not 0.0 < top_p <= 1.0:
        raise ValueError(f"generate: top_p must be in (0, 1], got {top_p!r}")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0:
        raise ValueError(f"generate: top_k must be an int >= 0 (0 = no top-k filtering), got {top_k!r}")
    if not number(repetition_penalty) or repetition_penalty <= 0:
        raise ValueError(f"generate: repetition_penalty must be > 0 (1.0 = none), got {repetition_penalty!r}")
    if not isinstance(num_beams, int) or isinstance(num_beams, bool) or num_beams < 1:
        raise ValueError(f"generate: num_beams must be an int >= 1, got {num_beams!r}")
    if not number(length_penalty):
        raise ValueError(f"generate: length_penalty must be a number, got {length_penalty!r}")
    if cache not in CACHES:
        raise ValueError(f"generate: cache must be one of {CACHES}, got {cache!r}")
    if compile and cache != "static":
        raise ValueError("generate: compile=True compiles the static cache's decode step; pass cache='static'")
    stops = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings or [])
    if any(not isinstance(s, str) or not s for s in stops):
        raise ValueError(f"generate: stop_strings must be non-empty strings, got {stop_strings!r}")
    if stops and not callable(getattr(tokenizer, "decode", None)):
        raise ValueError("generate: stop_strings need a tokenizer with decode(ids) -> str (a LibraProcessor or a "
                         "TextTokenizer)")
    if num_beams > 1:
        if do_sample:
            raise ValueError("generate: beam search is deterministic; do_sample must be False with num_beams > 1")
        if repetition_penalty != 1.0 or stops:
            raise ValueError("generate: num_beams > 1 scores hypotheses by the model's log-probabilities; "
                             "repetition_penalty must be 1.0 and stop_strings unset")
    return stops


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, vision_indices: torch.Tensor, attention_mask: torch.Tensor | None = None,
             contiguous_signal: torch.Tensor | None = None, *, max_new_tokens: int = 64, do_sample: bool = False,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
             eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
             stop_strings: str | list[str] | None = None, tokenizer=None, num_beams: int = 1,
             length_penalty: float = 1.0, cache: str = "dynamic", compile: bool = False,
             generator: torch.Generator | None = None) -> GenerationOutput:
    """Generate up to ``max_new_tokens`` tokens for a left-padded batch.

    Args:
        model: a LibraForCausalLM.
        input_ids: int64 [C, B, N]; vision_indices: int64 [B, N]; attention_mask: [B, N] (0 at left padding) or
            None; contiguous_signal: float [B, N, cs] or None (the prompt's CLIP features; generated tokens get none).
        max_new_tokens: at most this many new tokens per sequence. do_sample: sample (else greedy); temperature
            0 also means greedy. top_k (0 = off), top_p (1 = off): filtering when sampling. repetition_penalty:
            transformers' penalty on every id already in the sequence (1 = off). eos_token_id: stop id(s)
            (default the config's); a finished row gets ``pad_token_id`` (default the config's). stop_strings: a
            row also finishes once its generated text (``tokenizer.decode`` of row 0) contains one of them.
            generator: for sampling.
        num_beams: > 1 for beam search over text tokens (no row's prompt may end inside an image); hypotheses end
            at EOS and are ranked by summed log-probability / generated length ** ``length_penalty`` (the EOS
            counted); the best one per row is returned with its score in ``sequences_scores``.
        cache: "dynamic" (the general cache, every step through the model's forward) or "static" (text steps on
            the static cache). compile: compile the static cache's decode step (see the module docstring).
    Returns:
        GenerationOutput (sequences [C, B, N + T] with T <= max_new_tokens).
    """
    config = model.config
    stops = _check_arguments(max_new_tokens, do_sample, temperature, top_p, top_k, repetition_penalty, num_beams,
                             length_penalty, cache, compile, stop_strings, tokenizer)
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 3:
        raise ValueError("generate: input_ids must be an int64 tensor [C, B, N]")
    _, batch, length = input_ids.shape
    if length == 0:
        raise ValueError("generate: the prompt must have at least one token")
    device = input_ids.device
    if attention_mask is None:
        attention_mask = torch.ones(batch, length, dtype=torch.long, device=device)
    elif not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != (batch, length):
        raise ValueError(f"generate: attention_mask must be [B, N] = {(batch, length)}")
    elif not bool((attention_mask[:, -1] != 0).all()):
        raise ValueError("generate: the prompt batch must be left-padded (attention_mask[:, -1] must be 1)")
    if num_beams > 1 and isinstance(vision_indices, torch.Tensor) and \
            bool((vision_indices[:, -1] < config.eoi_vision_index).any()):
        raise ValueError("generate: beam search decodes text; a prompt ending at BOI or inside an image needs "
                         "num_beams=1")
    eos = [config.eos_token_id] if eos_token_id is None else (
        [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    pad = config.pad_token_id if pad_token_id is None else pad_token_id
    attention_mask = attention_mask.long()
    decoder = _Decoder(model, cache, compile, batch * num_beams, length + max_new_tokens)
    prompt = (input_ids, vision_indices.long(), attention_mask)

    was_training = model.training
    model.eval()
    try:
        if num_beams > 1:
            out = _beam_search(decoder, prompt, contiguous_signal, num_beams=num_beams, length_penalty=length_penalty,
                              max_new_tokens=max_new_tokens, eos=eos, pad=pad)
        else:
            out = _decode(decoder, prompt, contiguous_signal, max_new_tokens=max_new_tokens, do_sample=do_sample,
                          temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
                          eos=eos, pad=pad, stops=stops, tokenizer=tokenizer, generator=generator)
    finally:
        model.train(was_training)
    return out


def _stopped(tokenizer, stops: list[str], new_tokens: torch.Tensor, finished: torch.Tensor) -> torch.Tensor:
    """bool [B]: the unfinished rows whose generated text (row 0 of new_tokens [C, B, t]) holds a stop string."""
    hits = torch.zeros_like(finished)
    ids = new_tokens[0].tolist()
    for b, done in enumerate(finished.tolist()):
        if not done:
            text = tokenizer.decode(ids[b])
            hits[b] = any(s in text for s in stops)
    return hits


def _decode(decoder: _Decoder, prompt, contiguous_signal, *, max_new_tokens, do_sample, temperature, top_k, top_p,
            repetition_penalty, eos, pad, stops, tokenizer, generator) -> GenerationOutput:
    """Greedy decoding or sampling (one hypothesis per row)."""
    input_ids, vision_indices, attention_mask = prompt
    config = decoder.config
    codebooks, batch, length = input_ids.shape
    device = input_ids.device
    text_index = config.max_vision_token_length
    eos_ids = torch.tensor(eos, device=device)
    logits = decoder.prefill(input_ids, vision_indices, attention_mask, contiguous_signal)
    previous = input_ids.masked_fill(attention_mask[None] == 0, -1)  # padding is never penalized
    sequences, indices = [input_ids], [vision_indices]
    fed_index = vision_indices[:, -1]
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        next_index = (fed_index + 1).clamp(max=text_index)
        next_index = torch.where(finished, text_index, next_index)
        if logits.shape[-1] == config.total_vocab_size:  # static text steps need no rule: they feed and see text
            logits = constrain_logits(logits, fed_index, next_index, config)
        if repetition_penalty != 1.0:
            history = torch.cat([previous, *sequences[1:]], dim=-1)[:logits.shape[0]]
            logits = apply_repetition_penalty(logits.flatten(0, 1), history.flatten(0, 1),
                                              repetition_penalty).view_as(logits)
        tokens = choose_tokens(logits, next_index == text_index, do_sample=do_sample, temperature=temperature,
                               top_p=top_p, top_k=top_k, generator=generator).expand(codebooks, batch)
        tokens = torch.where(finished[None], pad, tokens)
        finished = finished | torch.isin(tokens[0], eos_ids)
        sequences.append(tokens[:, :, None])
        indices.append(next_index[:, None])
        if stops:
            finished = finished | _stopped(tokenizer, stops, torch.cat(sequences[1:], dim=-1), finished)
        if bool(finished.all()) or step + 1 == max_new_tokens:
            break
        logits = decoder.step(tokens, next_index)
        fed_index = next_index
    return _output(sequences, indices, attention_mask, length)


def _output(sequences: list[torch.Tensor], indices: list[torch.Tensor], attention_mask: torch.Tensor, length: int,
            scores: torch.Tensor | None = None) -> GenerationOutput:
    new = sum(s.shape[-1] for s in sequences[1:])
    mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], new)], dim=-1)
    return GenerationOutput(torch.cat(sequences, dim=-1), torch.cat(indices, dim=-1), mask, length, scores)


def _beam_search(decoder: _Decoder, prompt, contiguous_signal, *, num_beams, length_penalty, max_new_tokens, eos,
                 pad) -> GenerationOutput:
    """Beam search over text tokens, as transformers' (its default early stopping): each step keeps the
    ``num_beams`` best unfinished extensions of every row; an extension by EOS among the best ``num_beams``
    candidates becomes a finished hypothesis; a row is done once it holds ``num_beams`` hypotheses and its best
    running beam, scored at the current length, cannot beat the worst of them. Scores are sums of the decoding
    distribution's log-probabilities (a forced newline after EOI counts 0) over length ** length_penalty."""
    input_ids, vision_indices, attention_mask = prompt
    config = decoder.config
    codebooks, batch, length = input_ids.shape
    device = input_ids.device
    vocab, text_index, beams = config.vocab_size, config.max_vision_token_length, num_beams
    logits = decoder.prefill(input_ids, vision_indices, attention_mask, contiguous_signal)
    fed = vision_indices[:, -1]
    logits = constrain_logits(logits, fed, torch.full_like(fed, text_index), config)
    log_probs = torch.log_softmax(logits[0, :, :vocab], dim=-1).repeat_interleave(beams, 0)  # [B·K, V]
    decoder.reorder(torch.arange(batch, device=device).repeat_interleave(beams))
    scores = torch.full((batch, beams), float("-inf"), device=device)
    scores[:, 0] = 0.0  # the K beams of a row start equal: only one may expand at the first step
    scores = scores.view(-1)
    tokens = torch.empty(batch * beams, 0, dtype=torch.long, device=device)
    finished: list[list[tuple[float, torch.Tensor]]] = [[] for _ in range(batch)]
    done = [False] * batch
    eos_set = set(eos)

    def normalized(total: float, size: int) -> float:
        return total / size ** length_penalty if size else total

    for step in range(max_new_tokens):
        candidates = (scores[:, None] + log_probs.float()).view(batch, beams * vocab)
        # Enough candidates that num_beams of them are not EOS even if every EOS id ranks high.
        top_scores, top = candidates.topk(min((1 + len(eos_set)) * beams, beams * vocab), dim=-1)
        parent_rows, next_tokens, next_scores = [], [], []
        for b, (row_scores, row_top) in enumerate(zip(top_scores.tolist(), top.tolist())):
            if done[b]:  # finished rows keep feeding padding until every row is done
                parent_rows += [b * beams] * beams
                next_tokens += [pad] * beams
                next_scores += [0.0] * beams
                continue
            chosen = 0
            for rank, (score, flat) in enumerate(zip(row_scores, row_top)):
                parent, token = b * beams + flat // vocab, flat % vocab
                if token in eos_set:
                    if rank < beams:
                        sequence = torch.cat([tokens[parent], tokens.new_tensor([token])])
                        finished[b].append((normalized(score, step + 1), sequence))
                        finished[b].sort(key=lambda h: -h[0])
                        del finished[b][beams:]
                    continue
                parent_rows.append(parent)
                next_tokens.append(token)
                next_scores.append(score)
                chosen += 1
                if chosen == beams:
                    break
            best_running = max(next_scores[-beams:])
            done[b] = len(finished[b]) == beams and finished[b][-1][0] >= normalized(best_running, step + 1)
        index = torch.tensor(parent_rows, device=device)
        new = torch.tensor(next_tokens, device=device)
        tokens = torch.cat([tokens.index_select(0, index), new[:, None]], dim=-1)
        scores = torch.tensor(next_scores, device=device)
        if all(done) or step + 1 == max_new_tokens:
            break
        decoder.reorder(index)
        logits = decoder.step(new[None].expand(codebooks, -1), torch.full_like(new, text_index))
        log_probs = torch.log_softmax(logits[0, :, :vocab], dim=-1)
    steps = tokens.shape[1]
    best, best_scores = [], []
    for b in range(batch):
        hypotheses = list(finished[b])
        if not done[b]:  # out of steps: the running beams compete at their full length
            hypotheses += [(normalized(float(scores[r]), steps), tokens[r]) for r in range(b * beams, (b + 1) * beams)]
        score, sequence = max(hypotheses, key=lambda h: h[0])
        best.append(sequence)
        best_scores.append(score)
    width = max(len(s) for s in best)
    generated = torch.full((batch, width), pad, dtype=torch.long, device=device)
    for b, sequence in enumerate(best):
        generated[b, :len(sequence)] = sequence
    sequences = [input_ids, generated[None].expand(codebooks, -1, -1)]
    indices = [vision_indices, torch.full((batch, width), text_index, dtype=torch.long, device=device)]
    return _output(sequences, indices, attention_mask, length, torch.tensor(best_scores, device=device))
