"""Top-K SAE encode: the k largest of z = (x - b_dec) W_enc + b_enc (after ReLU when `relu`) per row,
values descending, the lower latent index first among equal values, exactly as
`steerfast.ops.topk_sae_encode_torch`. x [B, d], W_enc [d, n] row-major, b_enc [n], b_dec [d].

Two kernels, no host sync (sizes come from shapes only: CUDA-graph safe):

1. `_topk_sae_encode_kernel`, grid (cdiv(B, BLOCK_M), n_chunks): one program per row tile and chunk of
   BLOCK_N latents. It computes z for its tile x chunk in registers (looping over d in BLOCK_D steps),
   then takes the chunk's top C = min(k, BLOCK_N) by C rounds of "max, then mask the winner out", and
   writes only those, in descending order, to an int64 workspace [B, n_chunks, C] (with one chunk,
   n <= BLOCK_N, it writes the output itself). The fp32 [B, n] pre-activations never go to memory.
   At B > 4 a chunk is >= 4 k wide (workspace <= n/4 keys a row); at B <= 4 chunks are sized for
   parallelism (~256+ programs, W_enc read at full bandwidth) and may be narrower than k, in which
   case all their latents are candidates (a workspace of <= n keys a row, <= 4 MB at n = 131072).
2. `_topk_sae_merge_kernel`, one program per row: a k-way merge of the row's n_chunks sorted candidate
   lists (k rounds, each a max over the n_chunks list heads; the winning list advances by one).

Ordering keys. A (value, latent) pair is packed into one int64 whose signed order is the wanted order:
high 32 bits = the fp32 value's bits mapped to a signed integer of the same order (negative floats
get their magnitude bits flipped; -0.0 is made +0.0 first, so the two zeros tie), low 32 bits =
0x7FFFFFFF - latent (so among equal values the lower latent is the larger key). Keys are unique, so
one integer max per round finds the winner and its tie-break at once, and masking it out removes
exactly one element. Padding and removed entries hold INT64_MIN, below every real key. The value
comes back bit-exact from the key. (NaN: a positive NaN sorts above +inf; unspecified otherwise.)

Arithmetic (fp32 semantics: the reference is the fp32 product of fp32 (x - b_dec) and W_enc upcast):
- B <= 4 (decode): "GEMV" form, no tensor cores, exactly fp32: fp32 (x - b_dec) times W_enc upcast to
  fp32 by FMAs into a [BLOCK_M, BLOCK_D, BLOCK_N] accumulator summed over BLOCK_D at the end; the
  next W_enc tile is loaded before the current one is used. Memory-bound on W_enc.
- B > 4: tl.dot on row tiles of 16. fp32 inputs: input_precision="ieee" (tf32 would be ~1e-3
  relative, far outside fp32's error). fp16/bf16 inputs: a = x - b_dec is formed in fp32 and split
  into hi = a rounded to the input dtype and lo = (a - hi) rounded to it; z = hi W + lo W with two
  16-bit tensor-core dots accumulating in fp32. hi + lo is a to 16 (bf16) / 22 (fp16) significant
  bits: exact when a has no more (as when |x| and |b_dec| are within ~2^7 / 2^10 of each other), else a
  relative error <= 2^-17 / 2^-22 per term, near fp32's, where one dot on a rounded to 16 bits would
  be 2^-9 / 2^-12 (and fail the tests' fp32-level tolerance). Precondition for fp16: |x - b_dec|
  <= 65504 (else hi overflows).

Under TRITON_INTERPRET=1 with bf16 the interpreter's tl.dot multiplies the raw uint16 storage, so
there the operands (hi, lo and the W tile, all exactly representable) go to tl.dot as fp32. The
interpreter also runs programs one by one, and each tl.max is a slow call there: the launcher gives
it fewer, wider chunks (`plan(interpret=True)`), the same kernels.
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from ._common import on_device, triton_interpret

_EMPTY = tl.constexpr(-(2 ** 63))  # INT64_MIN: padding and removed entries, below every real key
_GEMV_MAX_ROWS = 4  # B up to this: GEMV form (one program per row tile of next_pow2(B) rows)
_DOT_BLOCK_M = 16


@triton.jit
def _pack_keys(z, cols):
    """fp32 z and int32 latent indices (same shape) -> int64 keys (see module docstring)."""
    z = tl.where(z == 0.0, 0.0, z)  # -0.0 -> +0.0: the two zeros must tie
    bits = z.to(tl.int32, bitcast=True)
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return (ordered.to(tl.int64) << 32) + (0x7FFFFFFF - cols).to(tl.int64)


@triton.jit
def _unpack_keys(key):
    """int64 keys -> (fp32 value, int64 latent index)."""
    ordered = (key >> 32).to(tl.int32)
    bits = tl.where(ordered < 0, ordered ^ 0x7FFFFFFF, ordered)
    value = bits.to(tl.float32, bitcast=True)
    latent = 0x7FFFFFFF - (key & 0x7FFFFFFF)
    return value, latent


@triton.jit
def _preact_gemv(x_ptr, w_ptr, b_dec_ptr, rows, cols, B, d, n,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """(x[rows] - b_dec) W_enc[:, cols] by fp32 FMAs, [BLOCK_M, BLOCK_N]: a [BLOCK_M, BLOCK_D, BLOCK_N]
    accumulator, summed over BLOCK_D once at the end. The next W_enc tile is loaded before the current
    one is used (register double-buffering: twice the bytes in flight for this memory-bound loop)."""
    row_mask = rows < B
    col_mask = cols < n
    offs_d = tl.arange(0, BLOCK_D)
    x_ptrs = x_ptr + rows.to(tl.int64)[:, None] * d + offs_d[None, :]  # [BLOCK_M, BLOCK_D]
    w_ptrs = w_ptr + offs_d.to(tl.int64)[:, None] * n + cols[None, :]  # [BLOCK_D, BLOCK_N]
    bd_ptrs = b_dec_ptr + offs_d
    acc3 = tl.zeros([BLOCK_M, BLOCK_D, BLOCK_N], dtype=tl.float32)
    w = tl.load(w_ptrs, mask=(offs_d < d)[:, None] & col_mask[None, :], other=0.0)
    for d0 in range(0, d, BLOCK_D):
        d_mask = offs_d < d - d0
        w_ptrs += BLOCK_D * n
        w_next = tl.load(w_ptrs, mask=(offs_d < d - d0 - BLOCK_D)[:, None] & col_mask[None, :], other=0.0)
        xt = tl.load(x_ptrs, mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        bd = tl.load(bd_ptrs, mask=d_mask, other=0.0)
        a = xt.to(tl.float32) - bd.to(tl.float32)[None, :]  # [BLOCK_M, BLOCK_D]: x - b_dec in fp32
        acc3 += a[:, :, None] * w.to(tl.float32)[None, :, :]
        w = w_next
        x_ptrs += BLOCK_D
        bd_ptrs += BLOCK_D
    return tl.sum(acc3, axis=1)


@triton.jit
def _preact_dot(x_ptr, w_ptr, b_dec_ptr, rows, cols, B, d, n,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                DOT_PRECISION: tl.constexpr, SPLIT_16: tl.constexpr, INTERP_BF16: tl.constexpr):
    """(x[rows] - b_dec) W_enc[:, cols] with tl.dot, fp32 accumulation, [BLOCK_M, BLOCK_N] (see the
    module docstring for the fp32 / split-16-bit arithmetic)."""
    row_mask = rows < B
    col_mask = cols < n
    offs_d = tl.arange(0, BLOCK_D)
    x_ptrs = x_ptr + rows.to(tl.int64)[:, None] * d + offs_d[None, :]  # [BLOCK_M, BLOCK_D]
    w_ptrs = w_ptr + offs_d.to(tl.int64)[:, None] * n + cols[None, :]  # [BLOCK_D, BLOCK_N]
    bd_ptrs = b_dec_ptr + offs_d
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for d0 in range(0, d, BLOCK_D):
        d_mask = offs_d < d - d0
        xt = tl.load(x_ptrs, mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        bd = tl.load(bd_ptrs, mask=d_mask, other=0.0)
        w = tl.load(w_ptrs, mask=d_mask[:, None] & col_mask[None, :], other=0.0)
        x_ptrs += BLOCK_D
        bd_ptrs += BLOCK_D
        w_ptrs += BLOCK_D * n
        a = xt.to(tl.float32) - bd.to(tl.float32)[None, :]  # [BLOCK_M, BLOCK_D]: x - b_dec in fp32
        if SPLIT_16:
            hi = a.to(w.dtype)
            lo = (a - hi.to(tl.float32)).to(w.dtype)
            if INTERP_BF16:
                hi = hi.to(tl.float32)
                lo = lo.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(hi, w, acc)
            acc = tl.dot(lo, w, acc)
        else:
            # each chunk's dot starts from zero and is then added: chains of BLOCK_D and d / BLOCK_D
            # additions instead of one chain of d FMAs (on an H200 the chained form erred ~6x
            # cuBLAS's fp32 error at d = 4096, outside the 2x rule)
            acc += tl.dot(a, w, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _sae_preact_tile(
    x_ptr, w_ptr, b_enc_ptr, b_dec_ptr, rows, cols, B, d, n,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, SPLIT_16: tl.constexpr, INTERP_BF16: tl.constexpr,
):
    """z = (x[rows] - b_dec) W_enc[:, cols] + b_enc[cols] in fp32, [BLOCK_M, BLOCK_N]; rows >= B and
    cols >= n hold finite filler (nothing is read there) for the caller to mask."""
    if USE_DOT:
        acc = _preact_dot(x_ptr, w_ptr, b_dec_ptr, rows, cols, B, d, n, BLOCK_M, BLOCK_N, BLOCK_D,
                          DOT_PRECISION, SPLIT_16, INTERP_BF16)
    else:
        acc = _preact_gemv(x_ptr, w_ptr, b_dec_ptr, rows, cols, B, d, n, BLOCK_M, BLOCK_N, BLOCK_D)
    b_enc = tl.load(b_enc_ptr + cols, mask=cols < n, other=0.0).to(tl.float32)
    return acc + b_enc[None, :]


@triton.jit
def _topk_sae_encode_kernel(
    x_ptr,  # [B, d]
    w_ptr,  # [d, n], row-major
    b_enc_ptr,  # [n]
    b_dec_ptr,  # [d]
    ws_ptr,  # [B, n_chunks, C] int64 keys (written when not SINGLE)
    val_ptr,  # [B, k] fp32 (written when SINGLE)
    idx_ptr,  # [B, k] int64 (written when SINGLE)
    B, d, n,
    C,  # candidates per chunk: min(k, BLOCK_N); k itself when SINGLE
    n_chunks,
    RELU: tl.constexpr,
    SINGLE: tl.constexpr,  # one chunk holds every latent: write the final top-k
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, SPLIT_16: tl.constexpr, INTERP_BF16: tl.constexpr,
):
    pid_m = tl.program_id(0)
    chunk = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = chunk * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < B

    z = _sae_preact_tile(x_ptr, w_ptr, b_enc_ptr, b_dec_ptr, rows, cols, B, d, n,
                         BLOCK_M, BLOCK_N, BLOCK_D, USE_DOT, DOT_PRECISION, SPLIT_16, INTERP_BF16)
    if RELU:
        z = tl.maximum(z, 0.0)
    keys = _pack_keys(z, cols[None, :])
    keys = tl.where(row_mask[:, None] & (cols < n)[None, :], keys, _EMPTY)

    rows64 = rows.to(tl.int64)
    if SINGLE:
        out_off = rows64 * C
    else:
        out_off = (rows64 * n_chunks + chunk) * C
    for r in range(0, C):
        best = tl.max(keys, axis=1)  # [BLOCK_M]: the largest value, lowest latent among equal ones
        if SINGLE:  # (_unpack_keys inlined: a jit call per round is slow under TRITON_INTERPRET=1)
            ordered = (best >> 32).to(tl.int32)
            value = tl.where(ordered < 0, ordered ^ 0x7FFFFFFF, ordered).to(tl.float32, bitcast=True)
            latent = 0x7FFFFFFF - (best & 0x7FFFFFFF)
            tl.store(val_ptr + out_off + r, value, mask=row_mask)
            tl.store(idx_ptr + out_off + r, latent, mask=row_mask)
        else:
            tl.store(ws_ptr + out_off + r, best, mask=row_mask)
        keys = tl.where(keys == best[:, None], _EMPTY, keys)


@triton.jit
def _topk_sae_merge_kernel(
    ws_ptr,  # [B, n_chunks, C] int64 keys, each chunk's list descending
    val_ptr,  # [B, k] fp32
    idx_ptr,  # [B, k] int64
    n_chunks, C, k,
    BLOCK_N: tl.constexpr,  # latents per chunk (to find a winner's chunk from its latent)
    BLOCK_C: tl.constexpr,  # next power of two >= n_chunks
):
    row = tl.program_id(0).to(tl.int64)
    chunks = tl.arange(0, BLOCK_C)
    c_mask = chunks < n_chunks
    lists = ws_ptr + row * n_chunks * C + chunks.to(tl.int64) * C  # [BLOCK_C] list starts
    pos = tl.zeros([BLOCK_C], dtype=tl.int32)
    heads = tl.load(lists, mask=c_mask, other=_EMPTY)
    for r in range(0, k):
        best = tl.max(heads, axis=0)
        ordered = (best >> 32).to(tl.int32)  # _unpack_keys, inlined
        value = tl.where(ordered < 0, ordered ^ 0x7FFFFFFF, ordered).to(tl.float32, bitcast=True)
        latent = 0x7FFFFFFF - (best & 0x7FFFFFFF)
        tl.store(val_ptr + row * k + r, value)
        tl.store(idx_ptr + row * k + r, latent)
        won = chunks == (latent // BLOCK_N).to(tl.int32)  # keys are unique: exactly one list advances
        pos = pos + won.to(tl.int32)
        nxt = tl.load(lists + pos, mask=won & (pos < C), other=_EMPTY)
        heads = tl.where(won, nxt, heads)


def plan(B: int, n: int, k: int, elem_size: int = 2, interpret: bool = False) -> dict:
    """Block sizes and workspace shape, from shapes only (host-side, no sync)."""
    kp = triton.next_power_of_2(k)
    use_dot = B > _GEMV_MAX_ROWS
    if use_dot:
        # rows give the parallelism: wide chunks keep the workspace small (<= n/4 keys a row)
        block_n = min(512, max(128, 4 * kp))
        block_m = _DOT_BLOCK_M
    else:
        # decode, memory-bound on W_enc: chunks give the parallelism, ~256 programs or more (a chunk
        # narrower than k keeps all its latents as candidates: at most 4 x n keys, small at B <= 4)
        block_n = min(256, max(32, triton.next_power_of_2(triton.cdiv(n, 256))))
        if interpret:  # the interpreter runs programs one by one: fewer, wider chunks
            block_n = max(block_n, min(1024, triton.next_power_of_2(triton.cdiv(n, 16))))
        block_m = triton.next_power_of_2(B)
    block_n = min(block_n, max(16, triton.next_power_of_2(n)))
    if use_dot:
        # a W_enc tile of <= 32 KB a pipeline stage (3 stages)
        block_d = max(16, min(64, 32768 // (block_n * elem_size)))
        num_warps = 8 if block_n >= 512 else 4
    else:
        # W_enc tiles of 4096 elements (two in flight), an accumulator of <= 8192: <= ~128 registers a
        # thread at 8 warps, two programs an SM
        block_d = max(1, min(4096 // block_n, 8192 // (block_m * block_n)))
        num_warps = 8
    return dict(use_dot=use_dot, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
                n_chunks=triton.cdiv(n, block_n), C=min(k, block_n), num_warps=num_warps)


def topk_sae_encode(x, W_enc, b_enc, b_dec, k, relu=False):
    """(values fp32 [B, k] descending, indices int64 [B, k]) of the top-k of (x - b_dec) W_enc + b_enc
    (ReLU first when `relu`); among equal values the lower latent index first."""
    assert x.dim() == 2 and W_enc.dim() == 2 and x.shape[1] == W_enc.shape[0], "x [B, d], W_enc [d, n]"
    B, d = x.shape
    n = W_enc.shape[1]
    assert b_enc.shape == (n,) and b_dec.shape == (d,), "b_enc [n], b_dec [d]"
    assert x.dtype == W_enc.dtype == b_enc.dtype == b_dec.dtype and x.dtype in (
        torch.float32, torch.float16, torch.bfloat16)
    assert x.is_contiguous() and W_enc.is_contiguous() and b_enc.is_contiguous() and b_dec.is_contiguous()
    assert x.device == W_enc.device == b_enc.device == b_dec.device
    k = int(k)
    assert 1 <= k <= n < 2 ** 31 - 1, "need 1 <= k <= n"
    values = torch.empty((B, k), dtype=torch.float32, device=x.device)
    indices = torch.empty((B, k), dtype=torch.int64, device=x.device)
    if B == 0:
        return values, indices
    interp = triton_interpret()
    p = plan(B, n, k, x.element_size(), interp)
    single = p["n_chunks"] == 1
    if single:
        ws = values  # unused
        C = k
    else:
        C = p["C"]
        ws = torch.empty((B, p["n_chunks"], C), dtype=torch.int64, device=x.device)
    with on_device(x.device):
        _topk_sae_encode_kernel[(triton.cdiv(B, p["BLOCK_M"]), p["n_chunks"])](
            x, W_enc, b_enc, b_dec, ws, values, indices,
            B, d, n, C, p["n_chunks"],
            RELU=bool(relu), SINGLE=single,
            BLOCK_M=p["BLOCK_M"], BLOCK_N=p["BLOCK_N"], BLOCK_D=p["BLOCK_D"],
            USE_DOT=p["use_dot"], DOT_PRECISION="ieee", SPLIT_16=x.dtype != torch.float32,
            INTERP_BF16=interp and x.dtype == torch.bfloat16,
            num_warps=p["num_warps"], num_stages=3,
        )
        if not single:
            _topk_sae_merge_kernel[(B,)](
                ws, values, indices, p["n_chunks"], C, k,
                BLOCK_N=p["BLOCK_N"], BLOCK_C=triton.next_power_of_2(p["n_chunks"]),
                num_warps=4 if p["n_chunks"] >= 256 else 1,
            )
    return values, indices
