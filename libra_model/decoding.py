"""Batched decoding for Libra with the bridge KV cache (LIBRA.md §3.4, §9), without the reference's decoding bugs
(§11.7-8): EOS is written to every codebook row at the step it appears, a text token is drawn once and copied to all
codebook rows (codebook rows are drawn independently only at vision positions), and EOI→newline forcing uses a
large finite logit so sampling cannot produce NaN.

Vision-index bookkeeping: the next token's index is the previous one + 1, clipped to max_vision_token_length (text).
An image can thus only be generated after a prompt ending in BOI; it runs through the codes, then EOI, then text.
Within an image the codes never take the BOI/EOI ids and the slot at index R²+1 is always EOI, so a generated image
is always well formed (the reference leaves this to the model).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from libra_model.modules.cache import BridgeKVCache

FORCED_LOGIT = 1.0e4  # finite, so softmax over [FORCED_LOGIT, -inf, ...] is one-hot, never NaN


@dataclass
class GenerationOutput:
    """sequences: int64 [C, B, N + T] (prompt then T generated tokens, pad after EOS); vision_indices: int64
    [B, N + T]; attention_mask: int64 [B, N + T] (0 at left padding); num_prompt_tokens: N."""

    sequences: torch.Tensor
    vision_indices: torch.Tensor
    attention_mask: torch.Tensor
    num_prompt_tokens: int

    @property
    def new_tokens(self) -> torch.Tensor:
        """int64 [C, B, T]: the generated part of ``sequences``."""
        return self.sequences[:, :, self.num_prompt_tokens:]


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


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """One draw per row of logits [R, V'] (float32) with temperature and nucleus (top-p) filtering."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Drop a token when the tokens ranked above it already hold top_p; the first token always stays.
        drop = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def choose_tokens(logits: torch.Tensor, next_is_text: torch.Tensor, *, do_sample: bool, temperature: float,
                  top_p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next ids int64 [C, B] from logits [C, B, V + Vv]: greedy (argmax) or sampled; at text positions
    (``next_is_text`` [B]) the row-0 choice is copied to every codebook row."""
    codebooks, batch, width = logits.shape
    if do_sample and temperature > 0:
        tokens = _sample(logits.reshape(codebooks * batch, width), temperature, top_p, generator)
        tokens = tokens.view(codebooks, batch)
    else:
        tokens = logits.argmax(-1)
    return torch.where(next_is_text[None], tokens[:1], tokens)


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, vision_indices: torch.Tensor, attention_mask: torch.Tensor | None = None,
             contiguous_signal: torch.Tensor | None = None, *, max_new_tokens: int = 64, do_sample: bool = False,
             temperature: float = 1.0, top_p: float = 1.0, eos_token_id: int | list[int] | None = None,
             pad_token_id: int | None = None, generator: torch.Generator | None = None) -> GenerationOutput:
    """Generate up to ``max_new_tokens`` tokens for a left-padded batch.

    Args:
        model: a LibraForCausalLM.
        input_ids: int64 [C, B, N]; vision_indices: int64 [B, N]; attention_mask: [B, N] (0 at left padding) or
            None; contiguous_signal: float [B, N, cs] or None (the prompt's CLIP features; generated tokens get none).
        max_new_tokens: at most this many new tokens per sequence. do_sample: sample (else greedy); temperature
            0 also means greedy. top_p: nucleus filtering when sampling. eos_token_id: stop id(s) (default the
            config's); a finished row gets ``pad_token_id`` (default the config's). generator: for sampling.
    Returns:
        GenerationOutput (sequences [C, B, N + T] with T <= max_new_tokens).
    """
    config = model.config
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if do_sample and (not isinstance(temperature, (int, float)) or temperature < 0):
        raise ValueError(f"generate: temperature must be >= 0, got {temperature!r}")
    if not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0:
        raise ValueError(f"generate: top_p must be in (0, 1], got {top_p!r}")
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
    eos = [config.eos_token_id] if eos_token_id is None else (
        [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    pad = config.pad_token_id if pad_token_id is None else pad_token_id
    eos_ids = torch.tensor(eos, device=device)
    text_index = config.max_vision_token_length
    attention_mask = attention_mask.long()

    was_training = model.training
    model.eval()
    cache = BridgeKVCache(config.num_hidden_layers, capacity=length + max_new_tokens)
    out = model(input_ids, vision_indices, attention_mask, contiguous_signal, return_logits=False,
                past_key_values=cache)
    logits = model.last_logits(out.head_inputs, out.layout).float()
    sequences, indices, masks = [input_ids], [vision_indices.long()], [attention_mask]
    fed_index = vision_indices[:, -1].long()
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        next_index = (fed_index + 1).clamp(max=text_index)
        next_index = torch.where(finished, text_index, next_index)
        logits = constrain_logits(logits, fed_index, next_index, config)
        tokens = choose_tokens(logits, next_index == text_index, do_sample=do_sample, temperature=temperature,
                               top_p=top_p, generator=generator)
        tokens = torch.where(finished[None], pad, tokens)
        finished = finished | torch.isin(tokens[0], eos_ids)
        sequences.append(tokens[:, :, None])
        indices.append(next_index[:, None])
        masks.append(torch.ones(batch, 1, dtype=torch.long, device=device))
        if bool(finished.all()) or len(sequences) - 1 == max_new_tokens:
            break
        out = model(tokens[:, :, None], next_index[:, None], masks[-1], None, return_logits=False,
                    past_key_values=cache)
        logits = model.last_logits(out.head_inputs, out.layout).float()
        fed_index = next_index
    model.train(was_training)
    return GenerationOutput(torch.cat(sequences, dim=-1), torch.cat(indices, dim=-1), torch.cat(masks, dim=-1),
                            length)
