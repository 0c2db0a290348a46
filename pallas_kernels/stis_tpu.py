"""STIS (power-pattern) sparse attention as Pallas TPU (Mosaic) kernels, SPEC section 4.

API (same contract as :mod:`pallas_kernels.stis_gpu`)::

    stis_attention_tpu(q, k, v, valid, *, causal=True, window=8, sink=True, interpret=False) -> o

q [B, N, H, d]; k, v [B, N, Hk, d] (head g uses kv head g // (H // Hk)); valid bool [B, N]; o [B, N, H, d]
in q.dtype. Query i attends key j iff both are valid and, causally, ``0 <= i-j`` and (``i-j < window`` or
``i-j`` a power of two); bidirectionally ``|i-j| < window`` or ``i-j`` a positive power of two, or (``sink``
and ``j == N-1`` when that key is not already in the window). Scale 1/sqrt(d), float32 softmax, output 0 at
invalid queries and for an empty key set. Differentiable (``jax.custom_vjp``, grads for q, k, v) and usable
under ``jit`` with static shapes. ``interpret`` is forwarded to ``pallas_call`` (False, True or a
``pltpu.InterpretParams``).

Design
------
* Layout: heads packed into lanes (see :mod:`pallas_kernels.tpu_common`): tiles are ``[T rows, 128 lanes]``
  with T a power of two (16 .. 256, >= the window), K/V repeated over the GQA group in the wrapper.
* The key set is ``{i - o : o in O}`` for a static offset list O, so for one query tile and offset o the keys
  are one contiguous, shifted row range: no gather. Offsets with ``|o| < T`` are static (unaligned) slices of
  a float32 VMEM window built from the previous, current and next K/V tiles; offsets ``o >= T`` (powers of
  two, hence multiples of T) are whole tiles fetched by their own BlockSpec (index ``i - o/T``, clamped).
  The sink key (row N-1) comes as a separate 8-row block. An online softmax runs over the offsets.
* Masking is precomputed in XLA as bit masks: for every (row, offset) one bit "this pair is attended"
  (validity of both ends and range), packed 32 per int32 word; the kernel tests bits.
* Backward (flash-style, recomputation from the saved per-head logsumexp): a query-tile kernel for dQ
  (which also emits per-tile partial sums of the sink key's dK/dV) and a key-tile kernel for dK/dV: key j
  receives from queries ``j + o``, again shifted contiguous tiles of Q, dO, lse and delta, so dK/dV is a
  gather, deterministic, without atomics. The sink's dK/dV (a sum over all queries) is the XLA sum of the
  per-tile partials.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import tpu_common as tc

__all__ = ["stis_attention_tpu", "stis_offsets"]

_NEG = -1e30


def stis_offsets(n: int, window: int, causal: bool) -> tuple[int, ...]:
    """Offsets o = i - j of the STIS key set (sink excluded), |o| < n, sorted."""
    offs = {o for o in range(0, window) if o < n}
    p = 1
    while p < n:
        offs.add(p)
        p *= 2
    if not causal:
        offs.update(-o for o in range(1, window) if o < n)
    return tuple(sorted(offs))


@dataclasses.dataclass(frozen=True)
class _Cfg(tc.LaneGeometry):
    b: int
    n: int
    h: int
    hk: int
    d: int
    causal: bool
    window: int
    sink: bool
    interpret: Any
    block_rows: int | None = None

    @property
    def tile(self):
        if self.block_rows is not None:
            return max(tc.next_pow2(self.block_rows), 16, tc.next_pow2(max(self.window, 1)))
        t = min(256, max(16, tc.next_pow2(self.n)))
        return max(t, tc.next_pow2(max(self.window, 1)))

    @property
    def n_pad(self):
        return tc.round_up(self.n, self.tile)

    @property
    def nt(self):
        return self.n_pad // self.tile

    @property
    def offsets(self):
        return stis_offsets(self.n, self.window, self.causal)

    @property
    def win_offsets(self):
        return tuple((k, o) for k, o in enumerate(self.offsets) if abs(o) < self.tile)

    @property
    def al_offsets(self):
        return tuple((k, o) for k, o in enumerate(self.offsets) if abs(o) >= self.tile)

    @property
    def has_sink(self):
        return self.sink and not self.causal

    @property
    def nbits(self):
        return len(self.offsets) + (1 if self.has_sink else 0)


def _check_aligned(cfg: _Cfg):
    for _, o in cfg.al_offsets:
        assert o > 0 and o % cfg.tile == 0, (o, cfg.tile)


# ----------------------------------------------------------------------------------------------
# masks (XLA)
# ----------------------------------------------------------------------------------------------
def _shift(x, o, fill):
    """y[:, i] = x[:, i - o] (0 <= i - o < n) else fill; axis 1 is the sequence."""
    n = x.shape[1]
    if o == 0:
        return x
    if o > 0:
        return jnp.pad(x, ((0, 0), (o, 0)), constant_values=fill)[:, :n]
    return jnp.pad(x, ((0, 0), (0, -o)), constant_values=fill)[:, -o:-o + n]


def _masks(cfg: _Cfg, valid):
    """Query-centric and key-centric bit masks, int32 [B, n_pad, nw]."""
    n = cfg.n
    valid = valid.astype(bool)
    qbits, kbits = [], []
    for o in cfg.offsets:
        qbits.append(valid & _shift(valid, o, False))      # query i, key i - o
        kbits.append(valid & _shift(valid, -o, False))     # key j, query j + o
    if cfg.has_sink:
        i = jnp.arange(n)
        qbits.append(valid & valid[:, n - 1:n] & (n - 1 - i >= cfg.window)[None, :])
    pad = ((0, 0), (0, cfg.n_pad - n), (0, 0))
    qm = jnp.pad(tc.pack_bits(jnp.stack(qbits, axis=-1)), pad)
    km = jnp.pad(tc.pack_bits(jnp.stack(kbits, axis=-1)), pad)
    return qm, km


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------
def _fill_window(win, prev, cur, nxt, t):
    win[0:t, :] = prev[...].astype(jnp.float32)
    win[t:2 * t, :] = cur[...].astype(jnp.float32)
    win[2 * t:3 * t, :] = nxt[...].astype(jnp.float32)


def _fwd_kernel(cfg: _Cfg, *refs):
    t = cfg.tile
    na = len(cfg.al_offsets)
    it = iter(refs)
    qm_ref, q_ref = next(it), next(it)
    kp, kc, kn, vp, vc, vn = (next(it) for _ in range(6))
    k_al = [next(it) for _ in range(na)]
    v_al = [next(it) for _ in range(na)]
    if cfg.has_sink:
        ks_ref, vs_ref = next(it), next(it)
    o_ref, lse_ref = next(it), next(it)
    kwin, vwin = next(it), next(it)

    _fill_window(kwin, kp, kc, kn, t)
    _fill_window(vwin, vp, vc, vn, t)
    bd = tc.seg_matrix(cfg.d)
    qs = q_ref[...].astype(jnp.float32) * tc.scale_of(cfg.d)
    words = qm_ref[...]

    m = jnp.full((t, tc.LANES), _NEG, jnp.float32)
    l = jnp.zeros((t, tc.LANES), jnp.float32)
    acc = jnp.zeros((t, tc.LANES), jnp.float32)

    def update(state, kx, vx, bit):
        m, l, acc = state
        s = tc.seg_sum(qs * kx, bd)
        m_new = jnp.maximum(m, jnp.where(bit, s, _NEG))
        alpha = jnp.exp(m - m_new)
        p = jnp.where(bit, jnp.exp(s - m_new), 0.0)
        return m_new, alpha * l + p, alpha * acc + p * vx

    state = (m, l, acc)
    for k, o in cfg.win_offsets:
        state = update(state, kwin[pl.ds(t - o, t), :], vwin[pl.ds(t - o, t), :], tc.bit_of(words, k))
    for a, (k, o) in enumerate(cfg.al_offsets):
        state = update(state, k_al[a][...].astype(jnp.float32), v_al[a][...].astype(jnp.float32),
                       tc.bit_of(words, k))
    if cfg.has_sink:
        state = update(state, ks_ref[0:1, :].astype(jnp.float32), vs_ref[0:1, :].astype(jnp.float32),
                       tc.bit_of(words, len(cfg.offsets)))
    m, l, acc = state
    ok = l > 0.0
    safe_l = jnp.where(ok, l, 1.0)
    o_ref[...] = jnp.where(ok, acc / safe_l, 0.0).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(ok, m + jnp.log(safe_l), 0.0)


def _dq_kernel(cfg: _Cfg, *refs):
    t = cfg.tile
    na = len(cfg.al_offsets)
    it = iter(refs)
    qm_ref, q_ref, do_ref, lse_ref, dl_ref = (next(it) for _ in range(5))
    kp, kc, kn, vp, vc, vn = (next(it) for _ in range(6))
    k_al = [next(it) for _ in range(na)]
    v_al = [next(it) for _ in range(na)]
    if cfg.has_sink:
        ks_ref, vs_ref = next(it), next(it)
    dq_ref = next(it)
    if cfg.has_sink:
        dks_ref, dvs_ref = next(it), next(it)
    kwin, vwin = next(it), next(it)

    _fill_window(kwin, kp, kc, kn, t)
    _fill_window(vwin, vp, vc, vn, t)
    bd = tc.seg_matrix(cfg.d)
    scale = tc.scale_of(cfg.d)
    qs = q_ref[...].astype(jnp.float32) * scale
    do = do_ref[...].astype(jnp.float32)
    lse = lse_ref[...]
    delta = dl_ref[...]
    words = qm_ref[...]

    def grad(kx, vx, bit):
        s = tc.seg_sum(qs * kx, bd)
        p = jnp.where(bit, jnp.exp(s - lse), 0.0)
        dp = tc.seg_sum(do * vx, bd)
        ds = p * (dp - delta)
        return p, ds

    dq = jnp.zeros((t, tc.LANES), jnp.float32)
    for k, o in cfg.win_offsets:
        kx = kwin[pl.ds(t - o, t), :]
        _, ds = grad(kx, vwin[pl.ds(t - o, t), :], tc.bit_of(words, k))
        dq = dq + ds * kx
    for a, (k, o) in enumerate(cfg.al_offsets):
        kx = k_al[a][...].astype(jnp.float32)
        _, ds = grad(kx, v_al[a][...].astype(jnp.float32), tc.bit_of(words, k))
        dq = dq + ds * kx
    if cfg.has_sink:
        kx = ks_ref[0:1, :].astype(jnp.float32)
        p, ds = grad(kx, vs_ref[0:1, :].astype(jnp.float32), tc.bit_of(words, len(cfg.offsets)))
        dq = dq + ds * kx
        dks = jnp.sum(ds * qs, axis=0, keepdims=True)
        dvs = jnp.sum(p * do, axis=0, keepdims=True)
        dks_ref[...] = jnp.broadcast_to(dks, dks_ref.shape)
        dvs_ref[...] = jnp.broadcast_to(dvs, dvs_ref.shape)
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(cfg: _Cfg, *refs):
    t = cfg.tile
    na = len(cfg.al_offsets)
    it = iter(refs)
    km_ref, k_ref, v_ref = next(it), next(it), next(it)
    win_in = [[next(it) for _ in range(3)] for _ in range(4)]    # q, do, lse, delta x (prev, cur, next)
    al_in = [[next(it) for _ in range(na)] for _ in range(4)]
    dk_ref, dv_ref = next(it), next(it)
    wins = [next(it) for _ in range(4)]

    for w, (p_, c_, n_) in zip(wins, win_in):
        _fill_window(w, p_, c_, n_, t)
    bd = tc.seg_matrix(cfg.d)
    scale = tc.scale_of(cfg.d)
    kx = k_ref[...].astype(jnp.float32)
    vx = v_ref[...].astype(jnp.float32)
    words = km_ref[...]

    dk = jnp.zeros((t, tc.LANES), jnp.float32)
    dv = jnp.zeros((t, tc.LANES), jnp.float32)

    def contrib(dk, dv, qx, dox, lse, delta, bit):
        qs = qx * scale
        s = tc.seg_sum(qs * kx, bd)
        p = jnp.where(bit, jnp.exp(s - lse), 0.0)
        dp = tc.seg_sum(dox * vx, bd)
        ds = p * (dp - delta)
        return dk + ds * qs, dv + p * dox

    for k, o in cfg.win_offsets:
        rows = pl.ds(t + o, t)
        dk, dv = contrib(dk, dv, *(w[rows, :] for w in wins), tc.bit_of(words, k))
    for a, (k, o) in enumerate(cfg.al_offsets):
        dk, dv = contrib(dk, dv, *(al_in[x][a][...].astype(jnp.float32) for x in range(4)),
                         tc.bit_of(words, k))
    dk_ref[...] = dk
    dv_ref[...] = dv


# ----------------------------------------------------------------------------------------------
# pallas_call builders
# ----------------------------------------------------------------------------------------------
def _row_spec(t, idx_fn):
    return pl.BlockSpec((None, t, tc.LANES), idx_fn)


def _win_specs(cfg):
    t, nt = cfg.tile, cfg.nt
    return [
        _row_spec(t, lambda b, l, i: (b, jnp.maximum(i - 1, 0), l)),
        _row_spec(t, lambda b, l, i: (b, i, l)),
        _row_spec(t, lambda b, l, i: (b, jnp.minimum(i + 1, nt - 1), l)),
    ]


def _al_spec(cfg, o, sign):
    t, nt = cfg.tile, cfg.nt
    sh = o // t
    if sign < 0:   # query-centric: key tile i - o/T
        return _row_spec(t, lambda b, l, i: (b, jnp.maximum(i - sh, 0), l))
    return _row_spec(t, lambda b, l, i: (b, jnp.minimum(i + sh, nt - 1), l))


def _mask_spec(cfg, nw):
    return pl.BlockSpec((None, cfg.tile, nw), lambda b, l, i: (b, i, 0))


def _params(cfg, nbytes):
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel"),
                                vmem_limit_bytes=tc.vmem_limit(nbytes))


def _est_bytes(cfg, n_row_blocks, n_f32_scratch, isz):
    blk = cfg.tile * tc.LANES
    return 2 * n_row_blocks * blk * max(isz, 4) + n_f32_scratch * 3 * blk * 4 + 16 * blk * 4


def _fwd_call(cfg: _Cfg, qm, qp, kx, vx, ks, vs):
    t, na = cfg.tile, len(cfg.al_offsets)
    lw = cfg.lg * tc.LANES
    in_specs = [_mask_spec(cfg, qm.shape[-1]), _row_spec(t, lambda b, l, i: (b, i, l))]
    in_specs += _win_specs(cfg) * 2
    in_specs += [_al_spec(cfg, o, -1) for _, o in cfg.al_offsets] * 2
    args = [qm, qp, kx, kx, kx, vx, vx, vx] + [kx] * na + [vx] * na
    if cfg.has_sink:
        in_specs += [pl.BlockSpec((None, 8, tc.LANES), lambda b, l, i: (b, 0, l))] * 2
        args += [ks, vs]
    out_shape = [jax.ShapeDtypeStruct((cfg.b, cfg.n_pad, lw), qp.dtype),
                 jax.ShapeDtypeStruct((cfg.b, cfg.n_pad, lw), jnp.float32)]
    out_specs = [_row_spec(t, lambda b, l, i: (b, i, l))] * 2
    nbytes = _est_bytes(cfg, 10 + 2 * na, 2, qp.dtype.itemsize)
    return pl.pallas_call(
        functools.partial(_fwd_kernel, cfg),
        grid=(cfg.b, cfg.lg, cfg.nt),
        in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM((3 * t, tc.LANES), jnp.float32)] * 2,
        compiler_params=_params(cfg, nbytes),
        interpret=tc.interpret_arg(cfg.interpret),
        name="stis_fwd_tpu",
    )(*args)


def _dq_call(cfg: _Cfg, qm, qp, dop, lse, delta, kx, vx, ks, vs):
    t, na = cfg.tile, len(cfg.al_offsets)
    lw = cfg.lg * tc.LANES
    row = _row_spec(t, lambda b, l, i: (b, i, l))
    in_specs = [_mask_spec(cfg, qm.shape[-1]), row, row, row, row]
    in_specs += _win_specs(cfg) * 2
    in_specs += [_al_spec(cfg, o, -1) for _, o in cfg.al_offsets] * 2
    args = [qm, qp, dop, lse, delta, kx, kx, kx, vx, vx, vx] + [kx] * na + [vx] * na
    out_shape = [jax.ShapeDtypeStruct((cfg.b, cfg.n_pad, lw), qp.dtype)]
    out_specs = [row]
    if cfg.has_sink:
        in_specs += [pl.BlockSpec((None, 8, tc.LANES), lambda b, l, i: (b, 0, l))] * 2
        args += [ks, vs]
        out_shape += [jax.ShapeDtypeStruct((cfg.b, cfg.nt, 8, lw), jnp.float32)] * 2
        out_specs += [pl.BlockSpec((None, None, 8, tc.LANES), lambda b, l, i: (b, i, 0, l))] * 2
    nbytes = _est_bytes(cfg, 13 + 2 * na, 2, 4)
    return pl.pallas_call(
        functools.partial(_dq_kernel, cfg),
        grid=(cfg.b, cfg.lg, cfg.nt),
        in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM((3 * t, tc.LANES), jnp.float32)] * 2,
        compiler_params=_params(cfg, nbytes),
        interpret=tc.interpret_arg(cfg.interpret),
        name="stis_dq_tpu",
    )(*args)


def _dkv_call(cfg: _Cfg, km, kx, vx, qp, dop, lse, delta):
    t, na = cfg.tile, len(cfg.al_offsets)
    lw = cfg.lg * tc.LANES
    row = _row_spec(t, lambda b, l, i: (b, i, l))
    in_specs = [_mask_spec(cfg, km.shape[-1]), row, row]
    args = [km, kx, vx]
    for x in (qp, dop, lse, delta):
        in_specs += _win_specs(cfg)
        args += [x] * 3
    for x in (qp, dop, lse, delta):
        in_specs += [_al_spec(cfg, o, +1) for _, o in cfg.al_offsets]
        args += [x] * na
    out_shape = [jax.ShapeDtypeStruct((cfg.b, cfg.n_pad, lw), jnp.float32)] * 2
    nbytes = _est_bytes(cfg, 17 + 4 * na, 4, 4)
    return pl.pallas_call(
        functools.partial(_dkv_kernel, cfg),
        grid=(cfg.b, cfg.lg, cfg.nt),
        in_specs=in_specs, out_specs=[row, row], out_shape=out_shape,
        scratch_shapes=[pltpu.VMEM((3 * t, tc.LANES), jnp.float32)] * 4,
        compiler_params=_params(cfg, nbytes),
        interpret=tc.interpret_arg(cfg.interpret),
        name="stis_dkv_tpu",
    )(*args)


# ----------------------------------------------------------------------------------------------
# custom_vjp
# ----------------------------------------------------------------------------------------------
def _prep(cfg: _Cfg, k, v):
    kx = tc.expand_kv(k, cfg.h, cfg.h_pad, cfg.n_pad)
    vx = tc.expand_kv(v, cfg.h, cfg.h_pad, cfg.n_pad)
    ks = vs = None
    if cfg.has_sink:
        ks = jnp.broadcast_to(kx[:, cfg.n - 1:cfg.n, :], (cfg.b, 8, kx.shape[-1]))
        vs = jnp.broadcast_to(vx[:, cfg.n - 1:cfg.n, :], (cfg.b, 8, vx.shape[-1]))
    return kx, vx, ks, vs


def _forward(cfg: _Cfg, q, k, v, valid):
    qm, _ = _masks(cfg, valid)
    qp = tc.pack_heads(q, cfg.h_pad, cfg.n_pad)
    kx, vx, ks, vs = _prep(cfg, k, v)
    o_p, lse_p = _fwd_call(cfg, qm, qp, kx, vx, ks, vs)
    o = tc.unpack_heads(o_p, cfg.n, cfg.h, cfg.d)
    lse = tc.compact_stat(lse_p, cfg.n, cfg.h, cfg.d)
    return o, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _stis(cfg, q, k, v, valid):
    return _forward(cfg, q, k, v, valid)[0]


def _stis_fwd(cfg, q, k, v, valid):
    o, lse = _forward(cfg, q, k, v, valid)
    return o, (q, k, v, valid, o, lse)


def _stis_bwd(cfg, res, do):
    q, k, v, valid, o, lse = res
    qm, km = _masks(cfg, valid)
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)   # [B, N, H]
    lse_x = tc.expand_stat(lse, cfg.h_pad, cfg.n_pad, cfg.d)
    dl_x = tc.expand_stat(delta, cfg.h_pad, cfg.n_pad, cfg.d)
    qp = tc.pack_heads(q, cfg.h_pad, cfg.n_pad)
    dop = tc.pack_heads(do.astype(q.dtype), cfg.h_pad, cfg.n_pad)
    kx, vx, ks, vs = _prep(cfg, k, v)
    outs = _dq_call(cfg, qm, qp, dop, lse_x, dl_x, kx, vx, ks, vs)
    dq = tc.unpack_heads(outs[0], cfg.n, cfg.h, cfg.d)
    dk_x, dv_x = _dkv_call(cfg, km, kx, vx, qp, dop, lse_x, dl_x)
    if cfg.has_sink:
        dks = jnp.sum(outs[1][:, :, 0, :], axis=1)     # [B, lw]
        dvs = jnp.sum(outs[2][:, :, 0, :], axis=1)
        dk_x = dk_x.at[:, cfg.n - 1, :].add(dks)
        dv_x = dv_x.at[:, cfg.n - 1, :].add(dvs)
    dk = tc.reduce_kv_grad(dk_x, cfg.n, cfg.h, cfg.hk, cfg.d).astype(k.dtype)
    dv = tc.reduce_kv_grad(dv_x, cfg.n, cfg.h, cfg.hk, cfg.d).astype(v.dtype)
    return dq.astype(q.dtype), dk, dv, None


_stis.defvjp(_stis_fwd, _stis_bwd)


def stis_attention_tpu(q, k, v, valid, *, causal: bool = True, window: int = 8, sink: bool = True,
                       interpret: Any = False, block_rows: int | None = None):
    """STIS attention with Pallas TPU kernels (see the module docstring for the exact contract).

    ``block_rows`` (tuning/testing knob): rows per tile, rounded up to a power of two >= max(16, window);
    default min(256, next_pow2(N)).
    """
    b, n, h, d = q.shape
    hk = k.shape[2]
    if k.shape != (b, n, hk, d) or v.shape != k.shape:
        raise ValueError(f"bad shapes q {q.shape} k {k.shape} v {v.shape}")
    if h % hk:
        raise ValueError(f"H={h} must be a multiple of Hk={hk}")
    if valid.shape != (b, n):
        raise ValueError(f"valid must be [B, N], got {valid.shape}")
    if window < 1:
        raise ValueError("window must be >= 1")
    if q.dtype not in (jnp.float32, jnp.bfloat16):
        raise ValueError(f"unsupported dtype {q.dtype}")
    k = k.astype(q.dtype)
    v = v.astype(q.dtype)
    cfg = _Cfg(b=b, n=n, h=h, hk=hk, d=d, causal=bool(causal), window=int(window), sink=bool(sink),
               interpret=interpret, block_rows=block_rows)
    _check_aligned(cfg)
    return _stis(cfg, q, k, v, valid.astype(bool))
