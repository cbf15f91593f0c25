"""The delta rule's state chain as Triton kernels (imported only by triton_chain.py, lazily:
this module needs triton).

One program per (batch*head, column tile of the state): the chain never mixes the state's
columns (Delta's column c needs only S's column c, and so do S', the backward G and the map
[A | Bm]), so each program carries its [Dk, BLOCK_V] tile of the state in registers through
all nc chunks, one chunk after another, and only the per-chunk W, U, Kt tiles stream in.
Every tensor comes with its four strides [chunk, head, row, column], so strided keys (the
inputs' own views) need no copy. Rows past C, keys past Dk and columns past the last one are
masked (loaded as 0, never stored): a zero row of W, U and Kt leaves the state unchanged, so
C, Dk and the column count need not be powers of two. Products are fp32 with IEEE rounding
(no TF32): the chain compounds every rounding error over all chunks.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tile(ptr, base, rows, cols, row_stride, col_stride, mask):
    """The [len(rows), len(cols)] tile at ptr + base + rows*row_stride + cols*col_stride,
    0 where masked."""
    offsets = base + rows[:, None] * row_stride + cols[None, :] * col_stride
    return tl.load(ptr + offsets, mask=mask, other=0.0)


@triton.jit
def chain_forward_kernel(states, deltas, w, u, kt, decay, nc, C, Dk, Dv,
                         st_j, st_h, st_r, st_c, dl_j, dl_h, dl_r, dl_c,
                         w_j, w_h, w_r, w_c, u_j, u_h, u_r, u_c, kt_j, kt_h, kt_r, kt_c,
                         dc_j, dc_h, HAS_DECAY: tl.constexpr, BLOCK_C: tl.constexpr,
                         BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr):
    """states [nc + 1, BH, Dk, Dv] (states[0] given), deltas [nc, BH, C, Dv] written;
    w, kt [nc, BH, C, Dk], u [nc, BH, C, Dv], decay [nc, BH] (read if HAS_DECAY)."""
    head = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, BLOCK_C)  # token of the chunk
    keys = tl.arange(0, BLOCK_K)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok, key_ok, col_ok = rows < C, keys < Dk, cols < Dv
    state_mask = key_ok[:, None] & col_ok[None, :]
    chunk_mask = row_ok[:, None] & col_ok[None, :]
    s = _tile(states, head * st_h, keys, cols, st_r, st_c, state_mask)  # [BLOCK_K, BLOCK_V]
    for j in range(nc):
        jj = tl.cast(j, tl.int64)
        w_tile = _tile(w, jj * w_j + head * w_h, rows, keys, w_r, w_c,
                       row_ok[:, None] & key_ok[None, :])  # [BLOCK_C, BLOCK_K]
        u_tile = _tile(u, jj * u_j + head * u_h, rows, cols, u_r, u_c, chunk_mask)
        delta = u_tile - tl.dot(w_tile, s, input_precision="ieee")  # [BLOCK_C, BLOCK_V]
        tl.store(deltas + jj * dl_j + head * dl_h + rows[:, None] * dl_r + cols[None, :] * dl_c,
                 delta, mask=chunk_mask)
        kt_t = _tile(kt, jj * kt_j + head * kt_h, keys, rows, kt_c, kt_r,
                     key_ok[:, None] & row_ok[None, :])  # Kt^T [BLOCK_K, BLOCK_C]
        if HAS_DECAY:
            s = s * tl.load(decay + jj * dc_j + head * dc_h)
        s = s + tl.dot(kt_t, delta, input_precision="ieee")
        tl.store(states + (jj + 1) * st_j + head * st_h + keys[:, None] * st_r
                 + cols[None, :] * st_c, s, mask=state_mask)


@triton.jit
def chain_backward_kernel(g, w, kt, decay, ds, after, nc, C, Dk, Dv,
                          g_h, g_r, g_c, w_j, w_h, w_r, w_c, kt_j, kt_h, kt_r, kt_c,
                          dc_j, dc_h, ds_j, ds_h, ds_r, ds_c, af_j, af_h, af_r, af_c,
                          HAS_DECAY: tl.constexpr, HAS_AFTER: tl.constexpr,
                          BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr):
    """g [BH, Dk, Dv]: the gradient of the state after the last chunk, replaced by that of the
    first chunk's state: G_j = dS_j + decay_j G_{j+1} - W_j^T (Kt_j G_{j+1}), chunks in
    reverse; ds [nc, BH, Dk, Dv]; after [nc, BH, Dk, Dv] gets G_{j+1} (if HAS_AFTER)."""
    head = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, BLOCK_C)
    keys = tl.arange(0, BLOCK_K)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok, key_ok, col_ok = rows < C, keys < Dk, cols < Dv
    state_mask = key_ok[:, None] & col_ok[None, :]
    grad = _tile(g, head * g_h, keys, cols, g_r, g_c, state_mask)  # [BLOCK_K, BLOCK_V]
    for i in range(nc):
        jj = tl.cast(nc - 1 - i, tl.int64)
        if HAS_AFTER:
            tl.store(after + jj * af_j + head * af_h + keys[:, None] * af_r
                     + cols[None, :] * af_c, grad, mask=state_mask)
        kt_tile = _tile(kt, jj * kt_j + head * kt_h, rows, keys, kt_r, kt_c,
                        row_ok[:, None] & key_ok[None, :])  # [BLOCK_C, BLOCK_K]
        d_delta = tl.dot(kt_tile, grad, input_precision="ieee")  # [BLOCK_C, BLOCK_V]
        w_t = _tile(w, jj * w_j + head * w_h, keys, rows, w_c, w_r,
                    key_ok[:, None] & row_ok[None, :])  # W^T [BLOCK_K, BLOCK_C]
        ds_tile = _tile(ds, jj * ds_j + head * ds_h, keys, cols, ds_r, ds_c, state_mask)
        if HAS_DECAY:
            grad = grad * tl.load(decay + jj * dc_j + head * dc_h)
        grad = ds_tile + grad - tl.dot(w_t, d_delta, input_precision="ieee")
    tl.store(g + head * g_h + keys[:, None] * g_r + cols[None, :] * g_c, grad, mask=state_mask)


@triton.jit
def chain_map_kernel(m, w, u, kt, decay, nc, C, Dk, Dv,
                     m_h, m_r, m_c, w_j, w_h, w_r, w_c, u_j, u_h, u_r, u_c,
                     kt_j, kt_h, kt_r, kt_c, dc_j, dc_h, HAS_DECAY: tl.constexpr,
                     BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr):
    """m = [A | Bm] [BH, Dk, Dk + Dv] run through every chunk in place: the A columns see no
    U (the map's homogeneous part), the Bm columns see U's column c - Dk."""
    head = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, BLOCK_C)
    keys = tl.arange(0, BLOCK_K)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)  # of [A | Bm]
    row_ok, key_ok, col_ok = rows < C, keys < Dk, cols < Dk + Dv
    state_mask = key_ok[:, None] & col_ok[None, :]
    u_mask = row_ok[:, None] & (col_ok & (cols >= Dk))[None, :]
    run = _tile(m, head * m_h, keys, cols, m_r, m_c, state_mask)  # [BLOCK_K, BLOCK_V]
    for j in range(nc):
        jj = tl.cast(j, tl.int64)
        w_tile = _tile(w, jj * w_j + head * w_h, rows, keys, w_r, w_c,
                       row_ok[:, None] & key_ok[None, :])
        u_tile = _tile(u, jj * u_j + head * u_h, rows, cols - Dk, u_r, u_c, u_mask)
        delta = u_tile - tl.dot(w_tile, run, input_precision="ieee")
        kt_t = _tile(kt, jj * kt_j + head * kt_h, keys, rows, kt_c, kt_r,
                     key_ok[:, None] & row_ok[None, :])
        if HAS_DECAY:
            run = run * tl.load(decay + jj * dc_j + head * dc_h)
        run = run + tl.dot(kt_t, delta, input_precision="ieee")
    tl.store(m + head * m_h + keys[:, None] * m_r + cols[None, :] * m_c, run, mask=state_mask)
