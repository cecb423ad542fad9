"""Triton kernels of bridge attention: a FlashAttention-2 style forward and backward
(docs/operators.md, bridge_attention).

Forward: one program per (query block, head, batch row); online softmax in float32 (float64 for float64 input)
over the key tiles, log-sum-exp saved. Backward: a dq kernel (one program per query block, which also writes
delta_i = <dO_i, O_i>) then a dk/dv kernel (one program per key block of a key/value head, looping over the query
heads that share it), both recomputing the probabilities from the saved log-sum-exp.

A (query block, key tile) pair with queries and keys all of one modality has no cross-modal pair and does exactly
FlashAttention's work. Any other tile adds the bridge terms with a second product per step, masked by the pair
indicator c_ij: s += c * (q kb^T) and o += (c * p) vb (in the backward likewise for dP, dq, dk_bridge, dv_bridge).
In the forward and dq kernels the bridge work sits in branches beside the plain products, never instead of them,
so the loads of k, v stay software-pipelined. (Attending to bridged keys k + [m_j != m] kb with one product, for
tiles with one query modality, needs the walked key tile in registers: compiled for sm_90a that spilled and lost the
pipelining. The dk/dv kernel does it with its own key block, which stays put.)

How a tile's modality mix is known without a host sync: the launcher computes, on the device, a per-row running
count of vision tokens ``counts[b, j] = #vision among positions < j`` ([B, Nk + 1] int32, one cumsum). In the kernel
the number of vision tokens in positions [s, e) is counts[e] - counts[s]: two scalar loads, no reduction across the
program. Zero means all text, e - s all vision, anything else mixed. Per-token flags are loaded on bridged tiles only
(in the dk/dv kernel: on the query blocks a sweep computes).

Packed rows (``document_ids``, the HAS_DOC variant): the launcher computes on the device, per row, the start and
the (exclusive) end of each position's document ([B, Nk] int32 each, a running max / min; padding gets Nk). A query
block walks only the key tiles from its first query's document start to its last query's document end, and a key
block of the dk/dv kernel only the query blocks from its first key's document start to its last key's document end:
two scalar loads, no host sync. Documents are contiguous runs, so within a walked tile the mask is a bound per
row, kept in registers from the program's start (causal: keys from the query's document start on; for a key, queries
before its document's end), not a per-tile load of document ids (that cost the sm_90 forward a spill).

Causal tiles entirely above the diagonal are never visited (the loops stop at the last key a query block can see);
tiles entirely below it skip the causal mask. The dk/dv kernel sweeps its query blocks once per query modality that
sees the key block, with the keys and values as that modality sees them (k + [m_j != modality] k_bridge, formed once
per sweep): each step is FlashAttention's four products with two [BLOCK_N, D] operands and two accumulators live, and
the bridge gradients fall out of the sweep of the other modality. Query blocks of the other modality are walked with
predicated loads that read nothing and contribute zero (no branch, so the loads stay software-pipelined). Padded
keys are not masked per tile: a key's row of p^T only reaches its own gradients, zeroed once at the end. The
backward is deterministic: no atomics; the gradients of a shared key/value head (grouped-query attention) are summed
in registers by the one program that owns its key block, in one flat loop over (query head, query block).
"""

import os

import torch
import triton
import triton.language as tl

# The kernels are built in interpreter mode when TRITON_INTERPRET=1 at import (tests on machines without CUDA).
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
MAX_HEAD_DIM = 128  # larger heads fall back to the torch kernel (register budget of the accumulators)
LOG2E = 1.4426950408889634
# Kernels may only read module globals that are constexpr (the compiler refuses others).
_LOG2E = tl.constexpr(LOG2E)
_LN2 = tl.constexpr(0.6931471805599453)


# Autotuning candidates (BLOCK_M, BLOCK_N, warps, stages) per kernel and architecture, chosen from ahead-of-time
# compilations for sm_80 and sm_90a at head dims 64 and 128 (ptxas registers and spills, shared memory, pipelined
# loads: the table is in bench/NOTES.md, the check in tests/kernels/test_bridge_attention_compile.py); not yet timed
# on a GPU. Rules the numbers gave: an MMA tile has 16 rows per warp, so BLOCK_M = 16 x warps in the dq kernel and
# BLOCK_N = 16 x warps in the dk/dv kernel (more warps than 16-row slices replicate the other operand in every warp,
# and ptxas spills kilobytes); the tile the loop walks over (the keys of the dq kernel, the queries of the dk/dv
# kernel) is a B operand that every warp holds whole, 16 rows of it at head dim 128.
_CANDIDATES = {
    "fwd": {80: [(64, 64, 8, 3), (128, 32, 8, 3)], 90: [(64, 64, 8, 3), (128, 32, 8, 3)]},
    "dq": {80: [(128, 16, 8, 3), (64, 16, 4, 3)], 90: [(128, 16, 8, 3), (128, 16, 8, 2)]},
    "dkdv": {80: [(16, 64, 8, 2)], 90: [(16, 64, 8, 2)]},
}
ARCHITECTURES = (80, 90)  # compute capabilities the candidates are made for (sm_80: A100, sm_90a: H100/H200)
KERNELS = tuple(_CANDIDATES)


def _config(blocks: tuple[int, int, int, int]) -> triton.Config:
    m, n, warps, stages = blocks
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=warps, num_stages=stages)


def _blocks(config: triton.Config) -> tuple[int, int, int, int]:
    return config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages


def _architecture(capability: int) -> int:
    """The architecture whose candidates a GPU of compute capability ``capability`` (major * 10 + minor) gets: the
    newest of ARCHITECTURES not above it (sm_86/sm_89 take sm_80's, sm_100 sm_90's), the oldest for older GPUs."""
    return max((arch for arch in ARCHITECTURES if arch <= capability), default=ARCHITECTURES[0])


def candidate_configs(kernel: str, capability: int) -> list[triton.Config]:
    """The autotuning candidates of ``kernel`` ("fwd", "dq" or "dkdv") for a GPU of compute capability
    ``capability`` (an int, major * 10 + minor: 80 for A100, 90 for H100), others mapped to the nearest older
    architecture the candidates are made for (see ``ARCHITECTURES``)."""
    if kernel not in _CANDIDATES:
        raise ValueError(f"candidate_configs: kernel must be one of {KERNELS}, got {kernel!r}")
    if isinstance(capability, bool) or not isinstance(capability, int) or capability <= 0:
        raise TypeError(f"candidate_configs: capability must be a positive int (major * 10 + minor, e.g. 80 or 90), "
                        f"got {capability!r}")
    return [_config(blocks) for blocks in _CANDIDATES[kernel][_architecture(capability)]]


def _tuning(kernel: str) -> dict:
    """Autotuner arguments of ``kernel``: the candidates of every architecture, pruned at the first launch to those of
    the launching GPU (so each GPU only tries its own); under the interpreter a single small tile (no benchmarking).
    """
    if INTERPRETED:
        return dict(configs=[_config((16, 16, 1, 1))])
    blocks = sorted({b for arch in ARCHITECTURES for b in _CANDIDATES[kernel][arch]})

    def prune(configs, named_args, **kwargs):
        major, minor = torch.cuda.get_device_capability(named_args["Q"].device)
        wanted = set(_CANDIDATES[kernel][_architecture(10 * major + minor)])
        return [config for config in configs if _blocks(config) in wanted]

    return dict(configs=[_config(b) for b in blocks], prune_configs_by={"early_config_prune": prune})


# Autotuning picks one candidate per (key length bucket, head dim, causal, padding, dtype).
TUNE_KEY = ["n_bucket", "HEAD_DIM", "CAUSAL", "HAS_PAD", "HAS_DOC"]


@triton.jit
def _tile_offsets(row_stride, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """int32 [BLOCK, BLOCK_D] element offsets of a tile from its first row, computed once per program."""
    return tl.arange(0, BLOCK)[:, None] * row_stride + tl.arange(0, BLOCK_D)[None, :]


@triton.jit
def _load_rows(base, offs, start, n_rows, row_stride, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
               BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, live=True):
    """Rows [start, start + BLOCK) of a [n_rows, HEAD_DIM] slab with row stride ``row_stride``; zeros outside and
    where ``live`` (a scalar, or a [BLOCK, 1] per-row flag) is false: those elements are not read."""
    # The tile's start offset is an int64 scalar, so B·N·H·D beyond 2^31 is safe; in-tile offsets stay int32.
    ptrs = base + tl.cast(start, tl.int64) * row_stride + offs
    mask = (tl.arange(0, BLOCK)[:, None] < n_rows - start) & live
    if BLOCK_D != HEAD_DIM:  # a head dim that is not a power of two: the upper lanes are padding
        mask = mask & (tl.arange(0, BLOCK_D)[None, :] < HEAD_DIM)
    x = tl.load(ptrs, mask=mask, other=0.0)
    if UPCAST:  # the interpreter has no bfloat16/float16 arithmetic
        x = x.to(tl.float32)
    return x


@triton.jit
def _store_rows(base, offs, start, n_rows, row_stride, x, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
                BLOCK_D: tl.constexpr):
    """Store the [BLOCK, BLOCK_D] tile ``x`` (cast to the pointer's dtype) into rows [start, start + BLOCK)."""
    ptrs = base + tl.cast(start, tl.int64) * row_stride + offs
    mask = tl.arange(0, BLOCK)[:, None] < n_rows - start
    if BLOCK_D != HEAD_DIM:
        mask = mask & (tl.arange(0, BLOCK_D)[None, :] < HEAD_DIM)
    tl.store(ptrs, x.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _span_kind(count_row, start, end):
    """Modality of positions [start, end) from the running vision count: 0 all text, 1 all vision, 2 mixed."""
    n_vision = tl.load(count_row + end) - tl.load(count_row + start)
    return tl.where(n_vision == 0, 0, tl.where(n_vision == end - start, 1, 2))


@triton.jit
def _mask_scores(s, q_pos, k_pos, n_keys, pad_row, q_lo, q_hi, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                 HAS_PAD: tl.constexpr, HAS_DOC: tl.constexpr):
    """-inf at the disallowed pairs of an [M, N] score tile (query positions q_pos [M], key positions k_pos [N]; with
    documents, the start q_lo [M] and end q_hi [M] of each query's document)."""
    if MASKED:
        allowed = k_pos[None, :] < n_keys
        if CAUSAL:
            allowed = allowed & (k_pos[None, :] <= q_pos[:, None])
        s = tl.where(allowed, s, float("-inf"))
    if HAS_PAD:
        real = tl.load(pad_row + k_pos, mask=k_pos < n_keys, other=0)
        s = tl.where(real[None, :] != 0, s, float("-inf"))
    if HAS_DOC:  # packed rows: keys of the query's own document only (every tile: boundaries fall anywhere)
        inside = k_pos[None, :] >= q_lo[:, None]
        if not CAUSAL:  # (causal: keys after the query are masked already)
            inside = inside & (k_pos[None, :] < q_hi[:, None])
        s = tl.where(inside, s, float("-inf"))
    return s


@triton.jit
def _softmax_step(s, m_i, l_i, q_pos, k_pos, n_keys, pad_row, q_lo, q_hi, scale_log2, MASKED: tl.constexpr,
                  CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, HAS_DOC: tl.constexpr):
    """Online-softmax update for one tile of raw scores: (p, alpha, new max, new sum), in base-2 units."""
    s = _mask_scores(s * scale_log2, q_pos, k_pos, n_keys, pad_row, q_lo, q_hi, MASKED, CAUSAL, HAS_PAD, HAS_DOC)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row with no allowed key so far keeps m = -inf; subtracting 0 instead keeps exp2 finite (it gives 0).
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _fwd_tiles(acc, m_i, l_i, q, q_pos, q_kind, vis_q, k_base, v_base, kb_base, vb_base, kv_row, kv_offs, vis_row,
               count_row, pad_row, q_lo, q_hi, n_keys, scale_log2, lo, hi,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
               CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, HAS_DOC: tl.constexpr, UPCAST: tl.constexpr,
               ACC: tl.constexpr, PRECISION: tl.constexpr):
    """Accumulate the key tiles [lo, hi) into (acc, m_i, l_i) for one query block."""
    for start_n in range(lo, hi, BLOCK_N):
        k_pos = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(k_base, kv_offs, start_n, n_keys, kv_row, BLOCK_N, HEAD_DIM, BLOCK_D, UPCAST)
        v = _load_rows(v_base, kv_offs, start_n, n_keys, kv_row, BLOCK_N, HEAD_DIM, BLOCK_D, UPCAST)
        # A tile with queries and keys all of one modality has no cross-modal pair: plain attention only. The
        # bridge work sits in branches beside the plain products, so the k/v loads stay software-pipelined.
        bridged = (q_kind == 2) | (_span_kind(count_row, start_n, tl.minimum(start_n + BLOCK_N, n_keys)) != q_kind)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION, out_dtype=ACC)
        if bridged:
            cross = vis_q[:, None] != tl.load(vis_row + k_pos, mask=k_pos < n_keys, other=0)[None, :]
            kb = _load_rows(kb_base, kv_offs, start_n, n_keys, kv_row, BLOCK_N, HEAD_DIM, BLOCK_D, UPCAST)
            s += tl.where(cross, tl.dot(q, tl.trans(kb), input_precision=PRECISION, out_dtype=ACC), 0.0)
        p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, q_pos, k_pos, n_keys, pad_row, q_lo, q_hi, scale_log2,
                                           MASKED, CAUSAL, HAS_PAD, HAS_DOC)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION, out_dtype=ACC)
        if bridged:  # (the pair mask is recomputed: a value made inside a branch does not outlive it)
            cross = vis_q[:, None] != tl.load(vis_row + k_pos, mask=k_pos < n_keys, other=0)[None, :]
            vb = _load_rows(vb_base, kv_offs, start_n, n_keys, kv_row, BLOCK_N, HEAD_DIM, BLOCK_D, UPCAST)
            acc = tl.dot(tl.where(cross, p, 0.0).to(vb.dtype), vb, acc, input_precision=PRECISION, out_dtype=ACC)
    return acc, m_i, l_i


@triton.jit
def _causal_bounds(start_m, offset, n_keys, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """(full_hi, hi): key tiles below full_hi need no causal/bounds mask; no query of the block sees keys >= hi."""
    if CAUSAL:
        hi = tl.minimum(offset + start_m + BLOCK_M, n_keys)
        full_hi = tl.minimum(offset + start_m + 1, n_keys) // BLOCK_N * BLOCK_N
    else:
        hi = n_keys
        full_hi = n_keys // BLOCK_N * BLOCK_N
    return full_hi, hi


@triton.jit
def _document_key_bounds(full_hi, hi, q_first, q_last, dstart_row, dend_row, BLOCK_N: tl.constexpr,
                         HAS_DOC: tl.constexpr):
    """(lo, full_hi, hi) of the key tiles a query block with key positions [q_first, q_last] walks: with documents
    the tiles before the first query's document start and after the last query's document end hold no
    same-document pair and are skipped (document starts are non-decreasing along the row); read from the per-row
    starts and ends, two scalar loads, no host sync."""
    lo = 0
    if HAS_DOC:
        lo = tl.load(dstart_row + q_first) // BLOCK_N * BLOCK_N
        hi = tl.minimum(hi, tl.load(dend_row + q_last))
        full_hi = tl.minimum(full_hi, hi)
    return lo, full_hi, hi


@triton.autotune(key=TUNE_KEY, **_tuning("fwd"))
@triton.jit
def _bridge_fwd_kernel(Q, K, V, KB, VB, VIS, COUNTS, PAD, DSTART, DEND, OUT, LSE, n_queries, n_keys,
                       scale_log2: tl.float64, n_bucket, HEADS: tl.constexpr, KV_HEADS: tl.constexpr,
                       HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr,
                       HAS_DOC: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # The scale arrives in float64 so that float64 inputs keep full precision; the math runs in ACC.
    scale_log2 = tl.full([], scale_log2, ACC)
    # The last query blocks see the most keys under a causal mask: start them first.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    kvh = h // (HEADS // KV_HEADS)
    offset = n_keys - n_queries  # query i sits at key position i + offset
    q_row = HEADS * HEAD_DIM
    kv_row = KV_HEADS * HEAD_DIM
    q_offs = _tile_offsets(q_row, BLOCK_M, BLOCK_D)
    kv_offs = _tile_offsets(kv_row, BLOCK_N, BLOCK_D)
    q_head = (b * n_queries * HEADS + h) * HEAD_DIM
    kv_head = (b * n_keys * KV_HEADS + kvh) * HEAD_DIM
    vis_row = VIS + b * n_keys
    pad_row = PAD + b * n_keys
    count_row = COUNTS + b * (n_keys + 1)

    start_m = pid_m * BLOCK_M
    q = _load_rows(Q + q_head, q_offs, start_m, n_queries, q_row, BLOCK_M, HEAD_DIM, BLOCK_D, UPCAST)
    q_pos = offset + start_m + tl.arange(0, BLOCK_M)
    vis_q = tl.load(vis_row + q_pos, mask=q_pos < n_keys, other=0)
    q_kind = _span_kind(count_row, offset + start_m, tl.minimum(offset + start_m + BLOCK_M, n_keys))
    q_lo = q_pos
    q_hi = q_pos
    if HAS_DOC:
        q_lo = tl.load(DSTART + b * n_keys + q_pos, mask=q_pos < n_keys, other=0)
        if not CAUSAL:
            q_hi = tl.load(DEND + b * n_keys + q_pos, mask=q_pos < n_keys, other=0)

    m_i = tl.full([BLOCK_M], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_M], ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    full_hi, hi = _causal_bounds(start_m, offset, n_keys, BLOCK_M, BLOCK_N, CAUSAL)
    lo, full_hi, hi = _document_key_bounds(full_hi, hi, offset + start_m,
                                           tl.minimum(offset + start_m + BLOCK_M, n_keys) - 1, DSTART + b * n_keys,
                                           DEND + b * n_keys, BLOCK_N, HAS_DOC)
    acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, q_pos, q_kind, vis_q, K + kv_head, V + kv_head, KB + kv_head,
                               VB + kv_head, kv_row, kv_offs, vis_row, count_row, pad_row, q_lo, q_hi, n_keys,
                               scale_log2, lo, full_hi, HEAD_DIM, BLOCK_D, BLOCK_N, False, CAUSAL, HAS_PAD, HAS_DOC,
                               UPCAST, ACC, PRECISION)
    acc, m_i, l_i = _fwd_tiles(acc, m_i, l_i, q, q_pos, q_kind, vis_q, K + kv_head, V + kv_head, KB + kv_head,
                               VB + kv_head, kv_row, kv_offs, vis_row, count_row, pad_row, q_lo, q_hi, n_keys,
                               scale_log2, tl.maximum(full_hi, lo), hi, HEAD_DIM, BLOCK_D, BLOCK_N, True, CAUSAL,
                               HAS_PAD, HAS_DOC, UPCAST, ACC, PRECISION)

    # A query with no allowed key: zero output and lse = -inf (the contract of the operator).
    empty = l_i == 0
    l_safe = tl.where(empty, 1.0, l_i)
    _store_rows(OUT + q_head, q_offs, start_m, n_queries, q_row, acc / l_safe[:, None], BLOCK_M, HEAD_DIM, BLOCK_D)
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * _LN2)
    rows = start_m + tl.arange(0, BLOCK_M)
    tl.store(LSE + (b * HEADS + h) * n_queries + rows, lse.to(LSE.dtype.element_ty), mask=rows < n_queries)


@triton.jit
def _dq_tiles(dq, q, do, lse2, delta, q_pos, q_kind, vis_q, k_base, v_base, kb_base, vb_base, kv_row, kv_offs, vis_row,
              count_row, pad_row, q_lo, q_hi, n_keys, scale_log2, lo, hi,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
              CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, HAS_DOC: tl.constexpr, UPCAST: tl.constexpr,
              ACC: tl.constexpr, PRECISION: tl.constexpr):
    """Accumulate sum_j ds_ij k'_ij over the key tiles [lo, hi) into dq (unscaled) for one query block."""
    for start_n in range(lo, hi, BLOCK_N):
        k_pos = start_n + tl.arange(0, BLOCK_N)
        k = _load_rows(k_base, kv_offs, start_n, n_keys, kv_row, BLOCK_N, HEAD_DIM, BLOCK_D, UPCAST)
        v = _load_rows(v_base, kv_offs, start_n, n_keys, kv_row, BLOCK_N, HEAD_DIM, BLOCK_D, UPCAST)
        bridged = (q_kind == 2) | (_span_kind(count_row, start_n, tl.minimum(start_n + BLOCK_N, n_keys)) != q_kind)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION, out_dtype=ACC)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION, out_dtype=ACC)
        if bridged:
            cross = vis_q[:, None] != tl.load(vis_row + k_pos, mask=k_pos < n_keys, other=0)[None, :]
            kb = _load_rows(kb_base, kv_offs, start_n, n_keys, kv_row, BLOCK_N, HEAD_DIM, BLOCK_D, UPCAST)
            vb = _load_rows(vb_base, kv_offs, start_n, n_keys, kv_row, BLOCK_N, HEAD_DIM, BLOCK_D, UPCAST)
            s += tl.where(cross, tl.dot(q, tl.trans(kb), input_precision=PRECISION, out_dtype=ACC), 0.0)
            dp += tl.where(cross, tl.dot(do, tl.trans(vb), input_precision=PRECISION, out_dtype=ACC), 0.0)
        s = _mask_scores(s * scale_log2, q_pos, k_pos, n_keys, pad_row, q_lo, q_hi, MASKED, CAUSAL, HAS_PAD,
                         HAS_DOC)
        p = tl.exp2(s - lse2[:, None])
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION, out_dtype=ACC)
        if bridged:
            cross = vis_q[:, None] != tl.load(vis_row + k_pos, mask=k_pos < n_keys, other=0)[None, :]
            kb = _load_rows(kb_base, kv_offs, start_n, n_keys, kv_row, BLOCK_N, HEAD_DIM, BLOCK_D, UPCAST)
            dq = tl.dot(tl.where(cross, ds, 0.0).to(kb.dtype), kb, dq, input_precision=PRECISION, out_dtype=ACC)
    return dq


@triton.autotune(key=TUNE_KEY, **_tuning("dq"))
@triton.jit
def _bridge_dq_kernel(Q, K, V, KB, VB, VIS, COUNTS, PAD, DSTART, DEND, OUT, DO, LSE, DELTA, DQ, n_queries,
                      n_keys, scale: tl.float64, scale_log2: tl.float64, n_bucket, HEADS: tl.constexpr,
                      KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
                      HAS_PAD: tl.constexpr, HAS_DOC: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr,
                      PRECISION: tl.constexpr, WITH_DQ: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    scale = tl.full([], scale, ACC)
    scale_log2 = tl.full([], scale_log2, ACC)
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    kvh = h // (HEADS // KV_HEADS)
    offset = n_keys - n_queries
    q_row = HEADS * HEAD_DIM
    kv_row = KV_HEADS * HEAD_DIM
    q_offs = _tile_offsets(q_row, BLOCK_M, BLOCK_D)
    kv_offs = _tile_offsets(kv_row, BLOCK_N, BLOCK_D)
    q_head = (b * n_queries * HEADS + h) * HEAD_DIM
    kv_head = (b * n_keys * KV_HEADS + kvh) * HEAD_DIM
    vis_row = VIS + b * n_keys
    pad_row = PAD + b * n_keys
    count_row = COUNTS + b * (n_keys + 1)
    stat_row = (b * HEADS + h) * n_queries

    start_m = pid_m * BLOCK_M
    rows = start_m + tl.arange(0, BLOCK_M)
    do = _load_rows(DO + q_head, q_offs, start_m, n_queries, q_row, BLOCK_M, HEAD_DIM, BLOCK_D, UPCAST)
    out = _load_rows(OUT + q_head, q_offs, start_m, n_queries, q_row, BLOCK_M, HEAD_DIM, BLOCK_D, UPCAST)
    # delta_i = sum_j p_ij <dO_i, v'_ij> = <dO_i, O_i>: the softmax-gradient row term, read again by the dk/dv kernel.
    delta = tl.sum(do.to(ACC) * out.to(ACC), 1)
    tl.store(DELTA + stat_row + rows, delta, mask=rows < n_queries)
    if WITH_DQ:
        q = _load_rows(Q + q_head, q_offs, start_m, n_queries, q_row, BLOCK_M, HEAD_DIM, BLOCK_D, UPCAST)
        lse = tl.load(LSE + stat_row + rows, mask=rows < n_queries, other=float("-inf")).to(ACC)
        # lse = -inf (no allowed key, or a row past the end): +inf makes every p_ij = exp2(s - inf) exactly 0.
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * _LOG2E)
        q_pos = offset + rows
        vis_q = tl.load(vis_row + q_pos, mask=q_pos < n_keys, other=0)
        q_kind = _span_kind(count_row, offset + start_m, tl.minimum(offset + start_m + BLOCK_M, n_keys))
        q_lo = q_pos
        q_hi = q_pos
        if HAS_DOC:
            q_lo = tl.load(DSTART + b * n_keys + q_pos, mask=q_pos < n_keys, other=0)
            if not CAUSAL:
                q_hi = tl.load(DEND + b * n_keys + q_pos, mask=q_pos < n_keys, other=0)
        dq = tl.zeros([BLOCK_M, BLOCK_D], ACC)
        full_hi, hi = _causal_bounds(start_m, offset, n_keys, BLOCK_M, BLOCK_N, CAUSAL)
        lo, full_hi, hi = _document_key_bounds(full_hi, hi, offset + start_m,
                                               tl.minimum(offset + start_m + BLOCK_M, n_keys) - 1,
                                               DSTART + b * n_keys, DEND + b * n_keys, BLOCK_N, HAS_DOC)
        dq = _dq_tiles(dq, q, do, lse2, delta, q_pos, q_kind, vis_q, K + kv_head, V + kv_head, KB + kv_head,
                       VB + kv_head, kv_row, kv_offs, vis_row, count_row, pad_row, q_lo, q_hi, n_keys, scale_log2,
                       lo, full_hi, HEAD_DIM, BLOCK_D, BLOCK_N, False, CAUSAL, HAS_PAD, HAS_DOC, UPCAST, ACC,
                       PRECISION)
        dq = _dq_tiles(dq, q, do, lse2, delta, q_pos, q_kind, vis_q, K + kv_head, V + kv_head, KB + kv_head,
                       VB + kv_head, kv_row, kv_offs, vis_row, count_row, pad_row, q_lo, q_hi, n_keys, scale_log2,
                       tl.maximum(full_hi, lo), hi, HEAD_DIM, BLOCK_D, BLOCK_N, True, CAUSAL, HAS_PAD, HAS_DOC,
                       UPCAST, ACC, PRECISION)
        _store_rows(DQ + q_head, q_offs, start_m, n_queries, q_row, dq * scale, BLOCK_M, HEAD_DIM, BLOCK_D)


@triton.jit
def _dkdv_probs(st, dpt, lse2, delta, k_pos, q_pos, k_lo, k_hi, scale_log2, MASKED: tl.constexpr,
                CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr):
    """(p^T, ds^T) [BLOCK_N, BLOCK_M] from the raw transposed scores and dP^T of a tile (ds without the scale).
    Padded keys are not masked here: a key's row of p^T only reaches its own gradients, which the kernel zeroes.
    With documents (k_lo, k_hi [BLOCK_N]: the start and end of each key's document), queries outside the key's
    document get p = 0."""
    st *= scale_log2
    if MASKED:
        st = tl.where(k_pos[:, None] <= q_pos[None, :], st, float("-inf"))
    if HAS_DOC:
        inside = q_pos[None, :] < k_hi[:, None]
        if not CAUSAL:
            inside = inside & (q_pos[None, :] >= k_lo[:, None])
        st = tl.where(inside, st, float("-inf"))
    pt = tl.exp2(st - lse2[None, :])
    return pt, pt * (dpt - delta[None, :])


@triton.jit
def _dkdv_tiles(grad_k, grad_v, k, v, k_pos, q_group, do_group, q_row, q_offs, lse_group, delta_group, vis_row,
                count_row, k_lo, k_hi, n_queries, n_keys, offset, scale_log2, modality, lo, hi, GROUP: tl.constexpr,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr,
                CAUSAL: tl.constexpr, HAS_DOC: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr,
                PRECISION: tl.constexpr):
    """Accumulate the contributions of the queries of one ``modality`` (0 text, 1 vision) in the query blocks
    [lo, hi) of the GROUP query heads sharing the key/value head (pointers at the first: q_group, do_group of q/dO,
    lse_group, delta_group of the statistics) into the key block's (grad_k, grad_v) [BLOCK_N, BLOCK_D]. One flat loop
    over (head, block): nested loops carried more live values, and spilled. ``k``, ``v`` are the keys
    and values as those queries see them (k + [m_j != modality] k_bridge, likewise v), so each step is FlashAttention's
    work: four products. Blocks without a query of ``modality`` are skipped (their loads read nothing); in a mixed
    block the other modality's rows get zero probability. Scores are transposed: [BLOCK_N, BLOCK_M]."""
    n_blocks = tl.cdiv(tl.maximum(hi - lo, 0), BLOCK_M)
    for step in range(0, GROUP * n_blocks):
        g = step // n_blocks
        start_m = lo + (step - g * n_blocks) * BLOCK_M
        q_base = q_group + g * HEAD_DIM
        do_base = do_group + g * HEAD_DIM
        lse_row = lse_group + g * n_queries
        delta_row = delta_group + g * n_queries
        rows = start_m + tl.arange(0, BLOCK_M)
        q_pos = offset + rows
        q_kind = _span_kind(count_row, offset + start_m, tl.minimum(offset + start_m + BLOCK_M, n_keys))
        live = (q_kind == modality) | (q_kind == 2)
        # The loads sit outside the branch, predicated, so that they stay software-pipelined.
        q = _load_rows(q_base, q_offs, start_m, n_queries, q_row, BLOCK_M, HEAD_DIM, BLOCK_D, UPCAST, live)
        do = _load_rows(do_base, q_offs, start_m, n_queries, q_row, BLOCK_M, HEAD_DIM, BLOCK_D, UPCAST, live)
        in_rows = (rows < n_queries) & live
        lse = tl.load(lse_row + rows, mask=in_rows, other=float("-inf")).to(ACC)
        vis_q = tl.load(vis_row + q_pos, mask=in_rows, other=0)
        # lse2 = +inf gives p = 0: rows with no allowed key, past the end, or of the other modality.
        lse2 = tl.where((lse == float("-inf")) | (vis_q != modality), float("inf"), lse * _LOG2E)
        delta = tl.load(delta_row + rows, mask=in_rows, other=0.0)
        st = tl.dot(k, tl.trans(q), input_precision=PRECISION, out_dtype=ACC)
        dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION, out_dtype=ACC)
        pt, dst = _dkdv_probs(st, dpt, lse2, delta, k_pos, q_pos, k_lo, k_hi, scale_log2, MASKED, CAUSAL, HAS_DOC)
        grad_v = tl.dot(pt.to(do.dtype), do, grad_v, input_precision=PRECISION, out_dtype=ACC)
        grad_k = tl.dot(dst.to(q.dtype), q, grad_k, input_precision=PRECISION, out_dtype=ACC)
    return grad_k, grad_v


@triton.jit
def _store_rows_where(base, offs, start, n_rows, row_stride, x, which, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
                      BLOCK_D: tl.constexpr):
    """Store the rows of the [BLOCK, BLOCK_D] tile ``x`` where the bool [BLOCK] ``which`` holds."""
    ptrs = base + tl.cast(start, tl.int64) * row_stride + offs
    mask = (tl.arange(0, BLOCK)[:, None] < n_rows - start) & which[:, None]
    if BLOCK_D != HEAD_DIM:
        mask = mask & (tl.arange(0, BLOCK_D)[None, :] < HEAD_DIM)
    tl.store(ptrs, x.to(base.dtype.element_ty), mask=mask)


@triton.autotune(key=TUNE_KEY, **_tuning("dkdv"))
@triton.jit
def _bridge_dkdv_kernel(Q, K, V, KB, VB, VIS, COUNTS, PAD, DSTART, DEND, DO, LSE, DELTA, DK, DV, DKB, DVB,
                        n_queries, n_keys, scale: tl.float64, scale_log2: tl.float64, n_bucket, HEADS: tl.constexpr,
                        KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
                        HAS_PAD: tl.constexpr, HAS_DOC: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr,
                        PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    scale = tl.full([], scale, ACC)
    scale_log2 = tl.full([], scale_log2, ACC)
    pid_n = tl.program_id(0)
    kvh = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    group = HEADS // KV_HEADS
    offset = n_keys - n_queries
    q_row = HEADS * HEAD_DIM
    kv_row = KV_HEADS * HEAD_DIM
    q_offs = _tile_offsets(q_row, BLOCK_M, BLOCK_D)
    kv_offs = _tile_offsets(kv_row, BLOCK_N, BLOCK_D)
    kv_head = (b * n_keys * KV_HEADS + kvh) * HEAD_DIM
    vis_row = VIS + b * n_keys
    count_row = COUNTS + b * (n_keys + 1)

    start_n = pid_n * BLOCK_N
    k_pos = start_n + tl.arange(0, BLOCK_N)
    vis_k = tl.load(vis_row + k_pos, mask=k_pos < n_keys, other=0)
    k_kind = _span_kind(count_row, start_n, tl.minimum(start_n + BLOCK_N, n_keys))

    if CAUSAL:
        # Query i (key position i + offset) sees this block iff i + offset >= start_n; it sees all of it iff
        # i + offset >= start_n + BLOCK_N - 1. Blocks between need the causal mask; blocks before are skipped.
        first_m = tl.maximum(start_n - offset, 0) // BLOCK_M * BLOCK_M
        full_m = tl.minimum(tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - offset, 0), BLOCK_M) * BLOCK_M, n_queries)
    else:
        first_m = 0
        full_m = 0
    # Query blocks [q_begin, q_end) can hold a query of a document of this key block; the others are skipped.
    q_begin = 0
    q_end = n_queries
    k_lo = k_pos
    k_hi = k_pos
    if HAS_DOC:
        k_hi = tl.load(DEND + b * n_keys + k_pos, mask=k_pos < n_keys, other=0)
        if not CAUSAL:
            k_lo = tl.load(DSTART + b * n_keys + k_pos, mask=k_pos < n_keys, other=0)
        q_begin = tl.minimum(tl.maximum(tl.load(DSTART + b * n_keys + start_n) - offset, 0) // BLOCK_M * BLOCK_M,
                             n_queries)
        last_end = tl.load(DEND + b * n_keys + tl.minimum(start_n + BLOCK_N, n_keys) - 1)
        q_end = tl.minimum(tl.cdiv(tl.maximum(last_end - offset, 0), BLOCK_M) * BLOCK_M, n_queries)
    # Which query modalities see this block at all (a sweep without queries is skipped).
    n_seen = n_keys - (offset + first_m)
    n_seen_vision = tl.load(count_row + n_keys) - tl.load(count_row + offset + first_m)
    # One sweep over the query blocks per query modality, with the keys and values as that modality sees them: two
    # [BLOCK_N, D] operands and two accumulators live (holding k, v, k_bridge, v_bridge and a bridge sweep does not
    # fit the register file at head dim 128). For key j the sweep of its own modality gives part of dk_j, the other
    # sweep gives dk_bridge_j and the rest of dk_j (likewise dv). The other modality goes first: then a block of one
    # modality keeps one accumulator running through both sweeps and writes each gradient once. A mixed block keeps
    # the first sweep's part of its rows of that modality in DK/DV and adds it at the end (same program: no atomics).
    first = tl.where(k_kind == 0, 1, 0)
    grad_k = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    grad_v = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    for sweep in tl.static_range(2):
        modality = first if sweep == 0 else 1 - first
        n_modality = tl.where(modality == 1, n_seen_vision, n_seen - n_seen_vision)
        bridged_rows = vis_k != modality
        if n_modality > 0:
            k = _load_rows(K + kv_head, kv_offs, start_n, n_keys, kv_row, BLOCK_N, HEAD_DIM, BLOCK_D, UPCAST)
            v = _load_rows(V + kv_head, kv_offs, start_n, n_keys, kv_row, BLOCK_N, HEAD_DIM, BLOCK_D, UPCAST)
            # k + [m_j != modality] k_bridge: the bridge rows of this modality's keys are never read.
            k += _load_rows(KB + kv_head, kv_offs, start_n, n_keys, kv_row, BLOCK_N, HEAD_DIM, BLOCK_D, UPCAST,
                            bridged_rows[:, None])
            v += _load_rows(VB + kv_head, kv_offs, start_n, n_keys, kv_row, BLOCK_N, HEAD_DIM, BLOCK_D, UPCAST,
                            bridged_rows[:, None])
            q_group = (b * n_queries * HEADS + kvh * group) * HEAD_DIM
            stat_group = (b * HEADS + kvh * group) * n_queries
            grad_k, grad_v = _dkdv_tiles(grad_k, grad_v, k, v, k_pos, Q + q_group, DO + q_group, q_row, q_offs,
                                         LSE + stat_group, DELTA + stat_group, vis_row, count_row, k_lo, k_hi,
                                         n_queries, n_keys, offset, scale_log2, modality, tl.maximum(first_m, q_begin),
                                         tl.minimum(full_m, q_end), group, HEAD_DIM, BLOCK_D, BLOCK_M, True, CAUSAL,
                                         HAS_DOC, UPCAST, ACC, PRECISION)
            grad_k, grad_v = _dkdv_tiles(grad_k, grad_v, k, v, k_pos, Q + q_group, DO + q_group, q_row, q_offs,
                                         LSE + stat_group, DELTA + stat_group, vis_row, count_row, k_lo, k_hi,
                                         n_queries, n_keys, offset, scale_log2, modality, tl.maximum(full_m, q_begin),
                                         q_end, group, HEAD_DIM, BLOCK_D, BLOCK_M, False, CAUSAL, HAS_DOC, UPCAST,
                                         ACC, PRECISION)
            if HAS_PAD:  # a padded key gets no probability, hence zero gradients
                real = tl.load(PAD + b * n_keys + k_pos, mask=k_pos < n_keys, other=0)
                grad_k = tl.where(real[:, None] != 0, grad_k, 0.0)
                grad_v = tl.where(real[:, None] != 0, grad_v, 0.0)
        # Rows whose modality differs from this sweep's: what this sweep added is their whole bridge gradient.
        _store_rows_where(DKB + kv_head, kv_offs, start_n, n_keys, kv_row, grad_k * scale, bridged_rows, BLOCK_N,
                          HEAD_DIM, BLOCK_D)
        _store_rows_where(DVB + kv_head, kv_offs, start_n, n_keys, kv_row, grad_v, bridged_rows, BLOCK_N, HEAD_DIM,
                          BLOCK_D)
        if sweep == 0:
            # Rows of the first sweep's modality (only in a mixed block): park their part, restart them at zero.
            _store_rows_where(DK + kv_head, kv_offs, start_n, n_keys, kv_row, grad_k * scale, ~bridged_rows, BLOCK_N,
                              HEAD_DIM, BLOCK_D)
            _store_rows_where(DV + kv_head, kv_offs, start_n, n_keys, kv_row, grad_v, ~bridged_rows, BLOCK_N,
                              HEAD_DIM, BLOCK_D)
            grad_k = tl.where(bridged_rows[:, None], grad_k, 0.0)
            grad_v = tl.where(bridged_rows[:, None], grad_v, 0.0)
        else:
            # ~bridged_rows are now the first sweep's bridged rows, whose dk/dv ran through both sweeps; the others
            # add the part parked in DK/DV by this program (the barrier makes its stores visible to all its threads).
            tl.debug_barrier()
            parked = bridged_rows[:, None]
            grad_k = grad_k * scale + _load_rows(DK + kv_head, kv_offs, start_n, n_keys, kv_row, BLOCK_N, HEAD_DIM,
                                                 BLOCK_D, False, parked).to(ACC)
            grad_v = grad_v + _load_rows(DV + kv_head, kv_offs, start_n, n_keys, kv_row, BLOCK_N, HEAD_DIM, BLOCK_D,
                                         False, parked).to(ACC)
            _store_rows(DK + kv_head, kv_offs, start_n, n_keys, kv_row, grad_k, BLOCK_N, HEAD_DIM, BLOCK_D)
            _store_rows(DV + kv_head, kv_offs, start_n, n_keys, kv_row, grad_v, BLOCK_N, HEAD_DIM, BLOCK_D)


# ----------------------------------------------------------------------------------------------------------------
# Launchers


def _meta(q: torch.Tensor, k: torch.Tensor, causal: bool, has_pad: bool, has_doc: bool) -> dict:
    """Compile-time arguments shared by the three kernels. The head counts are among them: compile-time row strides
    let the compiler derive the tiles' addresses (with runtime strides the sm_90 forward needs ~50% more registers
    and spills)."""
    n_keys = k.shape[1]
    upcast = INTERPRETED and q.dtype in (torch.float16, torch.bfloat16)
    wide = q.dtype == torch.float64
    return dict(n_bucket=triton.next_power_of_2(max(n_keys, 1)), HEADS=q.shape[2], KV_HEADS=k.shape[2],
                HEAD_DIM=q.shape[-1], BLOCK_D=max(16, triton.next_power_of_2(q.shape[-1])), CAUSAL=causal,
                HAS_PAD=has_pad, HAS_DOC=has_doc,
                UPCAST=upcast, ACC=tl.float64 if wide else tl.float32,
                # float32 products in true float32 (PyTorch's default for matmul), not TF32; 16-bit inputs ignore it
                PRECISION="ieee" if q.dtype in (torch.float32, torch.float64) else "tf32")


def _vision_counts(vision_mask: torch.Tensor) -> torch.Tensor:
    """int32 [B, Nk + 1]: counts[b, j] = number of vision tokens among positions < j of row b (on the device)."""
    counts = torch.zeros(vision_mask.shape[0], vision_mask.shape[1] + 1, dtype=torch.int32,
                         device=vision_mask.device)
    torch.cumsum(vision_mask, dim=1, dtype=torch.int32, out=counts[:, 1:])
    return counts


def _masks(vision_mask, key_padding_mask):
    """(vision flags uint8 [B, Nk], running counts, padding flags uint8 or a dummy pointer, has_pad)."""
    vis = vision_mask.contiguous().view(torch.uint8)
    counts = _vision_counts(vision_mask)
    if key_padding_mask is None:
        return vis, counts, vis, False
    return vis, counts, key_padding_mask.contiguous().view(torch.uint8), True


def _documents(document_ids, counts):
    """(starts, ends, has_doc): int32 [B, Nk], the first position of each position's document and the position
    after its last, computed on the device; padding (-1) gets Nk in both (a padding query sees no key, a padding key
    no query). Without documents dummy int32 pointers the kernels never read."""
    if document_ids is None:
        return counts, counts, False
    ids = document_ids.to(torch.int32).contiguous()
    length = ids.shape[1]
    index = torch.arange(length, dtype=torch.int32, device=ids.device).expand_as(ids)
    boundary = ids[:, 1:] != ids[:, :-1]  # a new document starts at j + 1
    starts = torch.where(torch.cat([torch.ones_like(ids[:, :1], dtype=torch.bool), boundary], 1), index, 0)
    ends = torch.where(torch.cat([boundary, torch.ones_like(ids[:, :1], dtype=torch.bool)], 1), index + 1, length)
    padding = ids < 0
    starts = starts.cummax(1).values.masked_fill(padding, length).to(torch.int32).contiguous()
    ends = ends.flip(1).cummin(1).values.flip(1).masked_fill(padding, length).to(torch.int32).contiguous()
    return starts, ends, True


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the saved log-sum-exp: float32, float64 for float64 inputs (exact gradients for gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def supports(q: torch.Tensor) -> bool:
    """Whether the kernels take these inputs (else the caller uses the torch kernel): head dims 1..128; float64 only
    under the interpreter (Triton 3.6 cannot lower these float64 products for a GPU)."""
    return 1 <= q.shape[-1] <= MAX_HEAD_DIM and (q.dtype != torch.float64 or q.device.type == "cpu")


def bridge_attention_forward(q, k, v, k_bridge, v_bridge, vision_mask, causal, softmax_scale, key_padding_mask,
                             document_ids=None):
    """Fused forward. q [B, Nq, H, D]; k, v, k_bridge, v_bridge [B, Nk, Hkv, D] (same float dtype, D <= 128);
    vision_mask / key_padding_mask bool [B, Nk]; document_ids int [B, Nk] (packed rows, -1 at padding) or None.
    Returns (out [B, Nq, H, D] in q's dtype, lse [B, H, Nq] in ``lse_dtype(q.dtype)``)."""
    q, k, v, k_bridge, v_bridge = (t.contiguous() for t in (q, k, v, k_bridge, v_bridge))
    batch, n_queries, heads, _ = q.shape
    n_keys = k.shape[1]
    out = torch.empty_like(q)
    lse = torch.empty(batch, heads, n_queries, dtype=lse_dtype(q.dtype), device=q.device)
    if out.numel() == 0:
        return out, lse
    vis, counts, pad, has_pad = _masks(vision_mask, key_padding_mask)
    starts, ends, has_doc = _documents(document_ids, counts)
    grid = lambda meta: (triton.cdiv(n_queries, meta["BLOCK_M"]), heads, batch)  # noqa: E731
    _bridge_fwd_kernel[grid](q, k, v, k_bridge, v_bridge, vis, counts, pad, starts, ends, out, lse, n_queries,
                             n_keys, softmax_scale * LOG2E, **_meta(q, k, causal, has_pad, has_doc))
    return out, lse


def bridge_attention_backward(grad_out, q, k, v, k_bridge, v_bridge, vision_mask, key_padding_mask, out, lse,
                              causal, softmax_scale, needs, document_ids=None):
    """Fused backward: (dq, dk, dv, dk_bridge, dv_bridge) in the inputs' dtypes, a [0] tensor for each input whose
    ``needs`` entry is False. Deterministic (no atomics). Shapes as in :func:`bridge_attention_forward`."""
    grad_out, q, k, v, k_bridge, v_bridge, out = (t.contiguous() for t in (grad_out, q, k, v, k_bridge, v_bridge,
                                                                           out))
    batch, n_queries, heads, _ = q.shape
    n_keys, kv_heads = k.shape[1], k.shape[2]
    want_q, want_kv = needs[0], any(needs[1:])
    if q.numel() == 0 or not (want_q or want_kv):  # no query: every gradient is zero
        return tuple(torch.zeros_like(t) if need else q.new_empty(0)
                     for t, need in zip((q, k, v, k_bridge, v_bridge), needs))
    # The kernels write every row of these buffers.
    dq = torch.empty_like(q) if want_q else q.new_empty(0)
    dkv = [torch.empty_like(t) if want_kv else None for t in (k, v, k_bridge, v_bridge)]
    vis, counts, pad, has_pad = _masks(vision_mask, key_padding_mask)
    starts, ends, has_doc = _documents(document_ids, counts)
    meta = _meta(q, k, causal, has_pad, has_doc)
    delta = torch.empty(batch, heads, n_queries, dtype=lse_dtype(q.dtype), device=q.device)
    scales = (softmax_scale, softmax_scale * LOG2E)
    grid_q = lambda meta_: (triton.cdiv(n_queries, meta_["BLOCK_M"]), heads, batch)  # noqa: E731
    # The dq kernel also writes delta, which the dk/dv kernel reads; without dq wanted it writes delta only.
    _bridge_dq_kernel[grid_q](q, k, v, k_bridge, v_bridge, vis, counts, pad, starts, ends, out, grad_out, lse,
                              delta,
                              dq if want_q else delta, n_queries, n_keys, *scales, WITH_DQ=want_q, **meta)
    if want_kv:
        grid_k = lambda meta_: (triton.cdiv(n_keys, meta_["BLOCK_N"]), kv_heads, batch)  # noqa: E731
        _bridge_dkdv_kernel[grid_k](q, k, v, k_bridge, v_bridge, vis, counts, pad, starts, ends, grad_out, lse,
                                    delta, *dkv,
                                    n_queries, n_keys, *scales, **meta)
    # Registered-op outputs must not alias each other: a fresh empty tensor for each gradient not asked for.
    return (dq, *(g if need else q.new_empty(0) for g, need in zip(dkv, needs[1:])))

