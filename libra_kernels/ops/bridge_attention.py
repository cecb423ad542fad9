"""Bridge attention: one softmax attention over all tokens in which cross-modal query/key pairs see keys and
values augmented by the low-rank bridge terms (docs/model.md §5; the contract in docs/operators.md, bridge_attention).

For query i and key j of row b, with c_ij = [vision_mask[b, i] != vision_mask[b, j]]:
    s_ij = scale * <q_i, k_j + c_ij kb_j>   over allowed j (j <= i when causal, key_padding_mask[b, j] True, and,
                                             for packed rows, document_ids[b, j] == document_ids[b, i] >= 0)
    out_i = sum_j softmax(s_i)_j (v_j + c_ij vb_j);   a query with no allowed key gets a zero output.
Queries may be fewer than keys (Nq <= Nk): they are the last Nq positions (FlashAttention's convention).

Parts: the reference ``bridge_attention_ref``; the "torch" kernel (the same math head-chunk by head-chunk, with an
explicit backward); the "triton" kernel (fused, FlashAttention-2 style, in ``bridge_attention_triton.py``; chosen by
"auto" on CUDA, runnable on the CPU only under ``TRITON_INTERPRET=1``); the registered operator
``torch.ops.libra.bridge_attention`` (+ ``_backward``) with fake implementations and autograd; the public
``bridge_attention``.

Unrequested gradients: every registered backward op (``_backward`` here) returns an empty
[0] tensor, its own, for each gradient not asked for; the autograd formula hands autograd None for it.
"""

from __future__ import annotations

import math

import torch

from libra_kernels.backend import Kernel, KernelTable, always_available, load_triton_kernels
from libra_kernels.validation import check_floating, check_like, check_shape, check_tensor

OP = "bridge_attention"
HEAD_CHUNK = 4  # heads per step of the torch kernel: bounds its two [B, heads, Nq, Nk] score tensors


def _pair_masks(vision_mask, causal, key_padding_mask, n_queries, document_ids=None):
    """(allowed, cross): bool [B, Nq, Nk] masks of the (query, key) pairs that are attended / cross-modal."""
    n_keys = vision_mask.shape[1]
    offset = n_keys - n_queries
    cross = vision_mask[:, offset:, None] != vision_mask[:, None, :]
    allowed = torch.ones_like(cross)
    if causal:
        query_pos = torch.arange(offset, n_keys, device=cross.device)
        allowed = allowed & (torch.arange(n_keys, device=cross.device)[None, :] <= query_pos[:, None])
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, :]
    if document_ids is not None:
        # Packed rows: a key is seen only by queries of its own document; padding (-1) is never a key.
        same = document_ids[:, offset:, None] == document_ids[:, None, :]
        allowed = allowed & same & (document_ids >= 0)[:, None, :]
    return allowed, cross


def _heads(t, index):
    """[B, N, Hkv, D] -> [B, len(index), N, D] for the kv heads in ``index``."""
    return t.index_select(2, index).transpose(1, 2)


def bridge_attention_ref(q, k, v, k_bridge, v_bridge, vision_mask, *, causal=True, softmax_scale=None,
                         key_padding_mask=None, document_ids=None):
    """Pure-PyTorch reference (differentiable by autograd): returns out [B, Nq, H, D] in q's dtype.

    Scores are computed in q's dtype and combined, masked and soft-maxed in float32 (float64 for float64 input);
    the probabilities are cast back to v's dtype for the value products, as in the reference model.
    """
    out, _ = _forward_torch(q, k, v, k_bridge, v_bridge, vision_mask, causal, softmax_scale, key_padding_mask,
                            document_ids)
    return out


def _forward_torch(q, k, v, k_bridge, v_bridge, vision_mask, causal, softmax_scale, key_padding_mask,
                   document_ids=None):
    batch, n_queries, heads, dim = q.shape
    group = heads // k.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(dim)
    stat = torch.promote_types(q.dtype, torch.float32)
    allowed, cross = _pair_masks(vision_mask, causal, key_padding_mask, n_queries, document_ids)
    allowed, cross_f = allowed[:, None], cross[:, None].to(stat)
    outs, lses = [], []
    for h0 in range(0, heads, HEAD_CHUNK):
        h1 = min(heads, h0 + HEAD_CHUNK)
        kv_index = torch.arange(h0, h1, device=q.device) // group
        qh = q[:, :, h0:h1].transpose(1, 2)
        kh, vh = _heads(k, kv_index), _heads(v, kv_index)
        kbh, vbh = _heads(k_bridge, kv_index), _heads(v_bridge, kv_index)
        scores = (qh @ kh.transpose(-1, -2)).to(stat) + cross_f * (qh @ kbh.transpose(-1, -2)).to(stat)
        scores = (scores * scale).masked_fill(~allowed, torch.finfo(stat).min)
        # Rows with no allowed key: the softmax is uniform over finfo.min entries, and the mask zeroes it.
        probs = torch.softmax(scores, dim=-1) * allowed
        lses.append(torch.logsumexp(scores.masked_fill(~allowed, -math.inf), dim=-1))
        probs_v = probs.to(v.dtype)
        outs.append(probs_v @ vh + (probs * cross_f).to(v.dtype) @ vbh)
    out = torch.cat(outs, dim=1).transpose(1, 2).to(q.dtype).contiguous() if outs else q.new_zeros(q.shape)
    lse = torch.cat(lses, dim=1) if lses else q.new_empty(batch, heads, n_queries, dtype=stat)
    return out, lse


def _backward_torch(grad_out, q, k, v, k_bridge, v_bridge, vision_mask, key_padding_mask, out, lse, causal,
                    softmax_scale, needs, document_ids=None):
    """Explicit backward of the math above (float32 or wider), recomputing the probabilities head-chunk-wise.

    With dp_ij = <dO_i, v_j + c_ij vb_j>, ds_ij = p_ij (dp_ij - <dO_i, o_i>):
    dq_i = scale Σ_j ds_ij (k_j + c_ij kb_j); dk_j = scale Σ_i ds_ij q_i; dkb_j = scale Σ_i c_ij ds_ij q_i;
    dv_j = Σ_i p_ij dO_i; dvb_j = Σ_i c_ij p_ij dO_i. Shared kv heads (GQA) sum over their query heads.
    """
    batch, n_queries, heads, dim = q.shape
    group = heads // k.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(dim)
    acc = torch.promote_types(q.dtype, torch.float32)
    allowed, cross = _pair_masks(vision_mask, causal, key_padding_mask, n_queries, document_ids)
    allowed, cross_f = allowed[:, None], cross[:, None].to(acc)
    grads = [torch.zeros(t.shape, dtype=acc, device=t.device) for t in (q, k, v, k_bridge, v_bridge)]
    dq, dk, dv, dkb, dvb = grads
    for h0 in range(0, heads, HEAD_CHUNK):
        h1 = min(heads, h0 + HEAD_CHUNK)
        kv_index = torch.arange(h0, h1, device=q.device) // group
        qh = q[:, :, h0:h1].transpose(1, 2).to(acc)
        kh, vh = _heads(k, kv_index).to(acc), _heads(v, kv_index).to(acc)
        kbh, vbh = _heads(k_bridge, kv_index).to(acc), _heads(v_bridge, kv_index).to(acc)
        do = grad_out[:, :, h0:h1].transpose(1, 2).to(acc)
        oh = out[:, :, h0:h1].transpose(1, 2).to(acc)
        scores = (qh @ kh.transpose(-1, -2) + cross_f * (qh @ kbh.transpose(-1, -2))) * scale
        # lse is -inf for a query with no allowed key; any finite stand-in works since the mask zeroes the row.
        lse_chunk = lse[:, h0:h1, :, None].to(acc)
        # masked_fill, not a product: a disallowed key's exp may overflow, and inf * 0 is nan.
        probs = torch.exp(scores - torch.where(torch.isinf(lse_chunk), 0, lse_chunk)).masked_fill(~allowed, 0)
        dprobs = do @ vh.transpose(-1, -2) + cross_f * (do @ vbh.transpose(-1, -2))
        dscores = probs * (dprobs - (do * oh).sum(-1, keepdim=True)) * scale
        dscores_cross = dscores * cross_f
        dq[:, :, h0:h1] = (dscores @ kh + dscores_cross @ kbh).transpose(1, 2)
        for grad, value in ((dk, dscores.transpose(-1, -2) @ qh), (dkb, dscores_cross.transpose(-1, -2) @ qh),
                            (dv, probs.transpose(-1, -2) @ do), (dvb, (probs * cross_f).transpose(-1, -2) @ do)):
            grad.index_add_(2, kv_index, value.transpose(1, 2))
    # Registered-op outputs must not alias each other: a fresh empty tensor for each gradient not asked for.
    return tuple(g.to(t.dtype) if need else q.new_empty(0)
                 for g, t, need in zip(grads, (q, k, v, k_bridge, v_bridge), needs))


_triton, _triton_unavailable = load_triton_kernels("libra_kernels.ops.bridge_attention_triton")


def _forward_triton(q, k, v, k_bridge, v_bridge, vision_mask, causal, softmax_scale, key_padding_mask,
                    document_ids=None):
    # Inputs the fused kernels do not take (head dims above 128, float64 on a GPU) use the torch kernel: same
    # outputs, same lse, so either backward applies.
    impl = _triton.bridge_attention_forward if _triton.supports(q) else _forward_torch
    return impl(q, k, v, k_bridge, v_bridge, vision_mask, causal, softmax_scale, key_padding_mask, document_ids)


def _backward_triton(grad_out, q, k, v, k_bridge, v_bridge, vision_mask, key_padding_mask, out, lse, causal,
                     softmax_scale, needs, document_ids=None):
    impl = _triton.bridge_attention_backward if _triton.supports(q) else _backward_torch
    return impl(grad_out, q, k, v, k_bridge, v_bridge, vision_mask, key_padding_mask, out, lse, causal,
                softmax_scale, needs, document_ids)


TABLE = KernelTable(OP, auto_order={"cuda": ("triton",)})
TABLE.register("torch", Kernel(_forward_torch, _backward_torch, always_available))
TABLE.register("triton", Kernel(_forward_triton, _backward_triton, _triton_unavailable))


@torch.library.custom_op("libra::bridge_attention", mutates_args=())
def bridge_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_bridge: torch.Tensor,
                        v_bridge: torch.Tensor, vision_mask: torch.Tensor, key_padding_mask: torch.Tensor | None,
                        document_ids: torch.Tensor | None, causal: bool, softmax_scale: float,
                        backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Registered operator: (out [B, Nq, H, D] in q's dtype, lse [B, H, Nq] float32 (float64 for float64 inputs, so
    that float64 gradients are exact); -inf where no key is allowed)."""
    return TABLE.get(backend).forward(q, k, v, k_bridge, v_bridge, vision_mask, causal, softmax_scale,
                                      key_padding_mask, document_ids)


@torch.library.custom_op("libra::bridge_attention_backward", mutates_args=())
def bridge_attention_backward_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 k_bridge: torch.Tensor, v_bridge: torch.Tensor, vision_mask: torch.Tensor,
                                 key_padding_mask: torch.Tensor | None, document_ids: torch.Tensor | None,
                                 out: torch.Tensor, lse: torch.Tensor, causal: bool, softmax_scale: float,
                                 needs: list[bool], backend: str
                                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Registered backward: (dq, dk, dv, dk_bridge, dv_bridge); a [0] tensor for each one not needed."""
    return TABLE.get(backend).backward(grad_out, q, k, v, k_bridge, v_bridge, vision_mask, key_padding_mask, out,
                                       lse, causal, softmax_scale, tuple(needs), document_ids)


@bridge_attention_op.register_fake
def _fake_forward(q, k, v, k_bridge, v_bridge, vision_mask, key_padding_mask, document_ids, causal, softmax_scale,
                  backend):
    batch, n_queries, heads, _ = q.shape
    return torch.empty_like(q), q.new_empty(batch, heads, n_queries, dtype=torch.promote_types(q.dtype, torch.float32))


@bridge_attention_backward_op.register_fake
def _fake_backward(grad_out, q, k, v, k_bridge, v_bridge, vision_mask, key_padding_mask, document_ids, out, lse,
                   causal, softmax_scale, needs, backend):
    return tuple(torch.empty_like(t) if need else q.new_empty(0)
                 for t, need in zip((q, k, v, k_bridge, v_bridge), needs))


def _setup_context(ctx, inputs, output):
    q, k, v, k_bridge, v_bridge, vision_mask, key_padding_mask, document_ids, causal, softmax_scale, backend = inputs
    ctx.save_for_backward(q, k, v, k_bridge, v_bridge, vision_mask, key_padding_mask, document_ids, *output)
    ctx.causal, ctx.softmax_scale, ctx.backend = causal, softmax_scale, backend


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, k_bridge, v_bridge, vision_mask, key_padding_mask, document_ids, out, lse = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:5])
    grads = bridge_attention_backward_op(grad_out.contiguous(), q, k, v, k_bridge, v_bridge, vision_mask,
                                         key_padding_mask, document_ids, out, lse, ctx.causal, ctx.softmax_scale,
                                         needs, ctx.backend)
    return (*(g if need else None for g, need in zip(grads, needs)), None, None, None, None, None, None)


bridge_attention_op.register_autograd(_backward, setup_context=_setup_context)


def _validate(q, k, v, k_bridge, v_bridge, vision_mask, causal, softmax_scale, key_padding_mask,
              document_ids=None) -> None:
    check_tensor(OP, "q", q, ndim=4)
    check_floating(OP, "q", q)
    batch, n_queries, heads, dim = q.shape
    check_tensor(OP, "k", k, ndim=4)
    n_keys, kv_heads = k.shape[1], k.shape[2]
    check_shape(OP, "k", k, (batch, None, None, dim), "[B, Nk, Hkv, D] with q's B and D")
    for name, t in (("v", v), ("k_bridge", k_bridge), ("v_bridge", v_bridge)):
        check_tensor(OP, name, t)
        check_shape(OP, name, t, tuple(k.shape), "the shape of k")
    check_like(OP, "q", q, k=k, v=v, k_bridge=k_bridge, v_bridge=v_bridge)
    if kv_heads == 0 or heads % kv_heads != 0:
        raise ValueError(f"{OP}: the number of query heads ({heads}) must be a multiple of the number of key/value "
                         f"heads ({kv_heads})")
    if n_queries > n_keys:
        raise ValueError(f"{OP}: q has {n_queries} positions but k only {n_keys}; queries must be the last positions "
                         f"of the key sequence (Nq <= Nk)")
    for name, mask in (("vision_mask", vision_mask), ("key_padding_mask", key_padding_mask)):
        if mask is None and name == "key_padding_mask":
            continue
        check_tensor(OP, name, mask)
        if mask.dtype != torch.bool:
            raise TypeError(f"{OP}: {name} must be a bool tensor, got {mask.dtype}")
        check_shape(OP, name, mask, (batch, n_keys), "[B, Nk], the key length")
        if mask.device != q.device:
            raise ValueError(f"{OP}: {name} is on {mask.device} but q is on {q.device}")
    if document_ids is not None:
        check_tensor(OP, "document_ids", document_ids)
        if document_ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{OP}: document_ids must be an int32/int64 tensor [B, Nk] (the document of each token, "
                            f"-1 at padding), got {document_ids.dtype}")
        check_shape(OP, "document_ids", document_ids, (batch, n_keys), "[B, Nk], the key length")
        if document_ids.device != q.device:
            raise ValueError(f"{OP}: document_ids is on {document_ids.device} but q is on {q.device}")
    if not isinstance(causal, bool):
        raise TypeError(f"{OP}: causal must be a bool, got {type(causal).__name__}")
    if softmax_scale is not None and (isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float))
                                      or not softmax_scale > 0):
        raise ValueError(f"{OP}: softmax_scale must be a positive number or None, got {softmax_scale!r}")


def bridge_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_bridge: torch.Tensor,
                     v_bridge: torch.Tensor, vision_mask: torch.Tensor, *, causal: bool = True,
                     softmax_scale: float | None = None, key_padding_mask: torch.Tensor | None = None,
                     document_ids: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """Attention with Libra's cross-modal bridge.

    Args:
        q: [B, Nq, H, D] float16/bfloat16/float32/float64, RoPE already applied.
        k, v, k_bridge, v_bridge: [B, Nk, Hkv, D] with H % Hkv == 0 (grouped-query attention), q's dtype; the
            bridge terms are the adapters of each key's own modality (RoPE applied to k and k_bridge alike).
        vision_mask: bool [B, Nk], True at vision tokens.
        causal: mask keys after the query position. softmax_scale: default 1/sqrt(D).
        key_padding_mask: bool [B, Nk] (True = real token) or None.
        document_ids: int32/int64 [B, Nk] or None: packed rows, the document of each token within its row
            (numbered from 0 in row order, -1 at padding). A query attends only keys of its own document; padding
            keys are never attended. Not checked for values (no device-to-host read): ids must be non-decreasing
            along each row, padding last. The "triton" kernels skip the key tiles (and, in the backward, the query
            blocks) that hold no same-document pair, from per-row document starts and ends computed on the device.
        backend: "auto", "torch" or "triton". "triton" (the default on CUDA) is the fused FlashAttention-2 style
            kernel: head dims up to 128 and float16/bfloat16/float32 (other inputs run the torch kernel); its
            backward is deterministic (no atomics; gradients of shared GQA heads are summed in one program). It
            autotunes its tile sizes on the first call for each key length bucket, head dim and dtype.
    Returns:
        out [B, Nq, H, D] in q's dtype; queries are the last Nq positions of the key sequence.
    """
    _validate(q, k, v, k_bridge, v_bridge, vision_mask, causal, softmax_scale, key_padding_mask, document_ids)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    name = TABLE.resolve(backend, q.device)
    return bridge_attention_op(q, k, v, k_bridge, v_bridge, vision_mask, key_padding_mask, document_ids, causal,
                               scale, name)[0]
