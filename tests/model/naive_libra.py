"""An independent, deliberately naive Libra forward written from docs/model.md alone, used as the oracle of the model
tests: sequence order throughout, routing by where() on the vision flags, the reference's two-pass bridge attention
(a key set and a value set per query modality, docs/model.md §5, §9), an additive mask clamped at the dtype minimum, and
the concatenated-vocabulary logits with -inf (docs/model.md §7). It reads the weights by their released names
(docs/model.md §13)."""

import math

import torch
import torch.nn.functional as F


def rms(x, weight, eps):
    variance = x.float().pow(2).mean(-1, keepdim=True) if x.dtype != torch.float64 else x.pow(2).mean(-1, True)
    return weight * (x * torch.rsqrt(variance + eps)).to(x.dtype)


def rotate(x, positions, theta):
    # x [B, H, N, d]; positions [B, N]
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = positions.double()[..., None] * inv
    angles = torch.cat([angles, angles], -1)[:, None].to(x.dtype)
    half = torch.cat([-x[..., d // 2:], x[..., :d // 2]], -1)
    return x * angles.cos() + half * angles.sin()


def naive_logits(state, config, input_ids, vision_indices, attention_mask=None, contiguous_signal=None,
                 plain_attention=False):
    """Logits [C, B, N, V + Vv] of the Libra defined by ``state`` (a name -> tensor dict)."""
    W = lambda name: state[name]  # noqa: E731
    C, B, N = input_ids.shape
    V, L = config.vocab_size, config.max_vision_token_length
    eps, d = config.rms_norm_eps, config.head_dim
    flag = vision_indices < L  # [B, N]
    col = flag[..., None]

    def routed(x, dense, expert, additive=False):
        low_rank = x @ W(expert + ".weight_A").T @ W(expert + ".weight_B").T
        full = x @ W(dense + ".weight").T
        if additive:
            return full + col * low_rank
        return torch.where(col, low_rank, full)

    def bridge(x, prefix):
        def on(side):
            name = f"{prefix}_bridge_on_{side}"
            return x @ W(name + ".weight_A").T @ W(name + ".weight_B").T

        return torch.where(col, on("vision"), on("language"))

    text = W("model.embed_tokens.weight")[input_ids[0].clamp(max=V - 1)]
    codes = (input_ids - V).clamp(min=0)
    vision = torch.cat([W(f"model.vision_embed_tokens.{c}.weight")[codes[c].clamp(max=config.vision_vocab_size - 1)]
                        for c in range(C)], -1)
    signal = contiguous_signal if contiguous_signal is not None else \
        vision.new_zeros(B, N, config.contiguous_signal_size)
    signal = signal.to(vision.dtype)
    if config.concat_signals:
        fused = torch.cat([vision, signal], -1)
        if config.norm_signals:
            fused = rms(fused, W("model.vision_signal_norm.weight"), eps)
        vision = fused @ W("model.vision_contiguous_signal_processor.weight").T
        h = torch.where(col, vision, text)
    else:
        h = torch.where(col, vision, text) + signal @ W("model.vision_contiguous_signal_processor.weight").T

    real = torch.ones(B, N, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    positions = torch.arange(N).expand(B, N) if attention_mask is None else \
        (real.long().cumsum(-1) - 1).masked_fill(~real, 1)
    minimum = torch.finfo(h.dtype).min
    causal = torch.triu(torch.ones(N, N, dtype=torch.bool), 1)
    mask = torch.zeros(B, 1, N, N, dtype=h.dtype).masked_fill(causal, minimum)
    mask = mask.masked_fill(~real[:, None, None, :], minimum)
    key_vision = flag[:, None, :, None]  # [B, 1, Nk, 1], broadcast over [B, H, Nk, d]

    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        a = p + "self_attn."
        x = torch.where(col, rms(h, W(p + "vision_input_layernorm.weight"), eps),
                        rms(h, W(p + "input_layernorm.weight"), eps))
        add = config.addition_mode
        q = routed(x, a + "q_proj", a + "vision_q_proj", add)
        k = routed(x, a + "k_proj", a + "vision_k_proj", add)
        v = routed(x, a + "v_proj", a + "vision_v_proj", add)
        if config.use_bridge:
            kb, vb = bridge(x, a + "vision_k"), bridge(x, a + "vision_v")
        else:
            kb, vb = torch.zeros_like(k), torch.zeros_like(v)
        heads = lambda t: t.view(B, N, -1, d).transpose(1, 2)  # noqa: E731
        q, k, v, kb, vb = map(heads, (q, k, v, kb, vb))
        group = q.shape[1] // k.shape[1]
        k, v, kb, vb = (t.repeat_interleave(group, dim=1) for t in (k, v, kb, vb))
        q = rotate(q, positions, config.rope_theta)
        if plain_attention:
            keys = rotate(k, positions, config.rope_theta)
            out = F.scaled_dot_product_attention(q, keys, v, attn_mask=mask)
        else:
            # Keys and values as seen by vision queries (bridge on language keys) and by language queries.
            k_for_v = rotate(k + (~key_vision) * kb, positions, config.rope_theta)
            k_for_l = rotate(k + key_vision * kb, positions, config.rope_theta)
            v_for_v, v_for_l = v + (~key_vision) * vb, v + key_vision * vb
            outs = []
            for keys, values in ((k_for_v, v_for_v), (k_for_l, v_for_l)):
                scores = (q @ keys.transpose(-1, -2) / math.sqrt(d) + mask).clamp(min=minimum)
                probs = torch.softmax(scores.float() if scores.dtype != torch.float64 else scores, -1)
                outs.append(probs.to(values.dtype) @ values)
            out = torch.where(flag[:, None, :, None], outs[0], outs[1])
        out = out.transpose(1, 2).reshape(B, N, -1)
        h = h + routed(out, a + "o_proj", a + "vision_o_proj", add)
        m = p + "mlp."
        x = torch.where(col, rms(h, W(p + "vision_post_attention_layernorm.weight"), eps),
                        rms(h, W(p + "post_attention_layernorm.weight"), eps))
        inner = F.silu(routed(x, m + "gate_proj", m + "vision_gate_proj")) * routed(x, m + "up_proj",
                                                                                    m + "vision_up_proj")
        h = h + routed(inner, m + "down_proj", m + "vision_down_proj")
    h = torch.where(col, rms(h, W("model.vision_norm.weight"), eps), rms(h, W("model.norm.weight"), eps))
    text_logits = h @ W("lm_head.weight").T
    head_in = h
    if config.vision_prediction_mode == "2d":
        head_in = predictors_2d(h, vision_indices, W("vision_hidden_placeholder"), config.image_feature_resolution)
    rows = []
    for c in range(C):
        vision_logits = head_in @ W(f"vision_lm_head.heads.{c}.weight").T
        rows.append(torch.cat([torch.where(col, -math.inf, text_logits),
                               torch.where(col, vision_logits, -math.inf)], -1))
    return torch.stack(rows)


def predictors_2d(h, vision_indices, placeholder, R):
    """docs/model.md §7 literally, image by image: pad the image's hidden states to a full 578-vector image with zeros,
    build pred(code at (r, c)) = [h(r-1, c) or P ; h(r, c-1) or (BOI for (0, 0)) or P], pred(EOI) = [h(last code) ;
    P] and the dummy [h(EOI) ; P], place them at BOI, code_1..code_576, EOI, keep the real positions."""
    B, N, D = h.shape
    out = torch.zeros(B, N, 2 * D, dtype=h.dtype)
    for b in range(B):
        for start in (vision_indices[b] == 0).nonzero().flatten().tolist():
            real = min(N - start, R * R + 2)
            image = torch.zeros(R * R + 2, D, dtype=h.dtype)
            image[:real] = h[b, start:start + real]
            boi, grid, eoi = image[0], image[1:R * R + 1].view(R, R, D), image[R * R + 1]
            vectors = []
            for r in range(R):
                for c in range(R):
                    up = grid[r - 1, c] if r > 0 else placeholder
                    left = grid[r, c - 1] if c > 0 else (boi if r == 0 else placeholder)
                    vectors.append(torch.cat([up, left]))
            vectors.append(torch.cat([grid[R - 1, R - 1], placeholder]))
            vectors.append(torch.cat([eoi, placeholder]))
            out[b, start:start + real] = torch.stack(vectors)[:real]
    return out


def naive_loss(logits, labels):
    """docs/model.md §8 on the concatenated vocabulary: mean over codebooks of the token-mean CE of
    logits[c, :, :-1] against labels[c, :, 1:] (ignore -100)."""
    losses = []
    for c in range(logits.shape[0]):
        losses.append(F.cross_entropy(logits[c, :, :-1].reshape(-1, logits.shape[-1]).double(),
                                      labels[c, :, 1:].reshape(-1), ignore_index=-100))
    return torch.stack(losses).mean()
