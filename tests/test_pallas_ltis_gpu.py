"""LTIS Pallas GPU kernels (pallas_kernels/ltis_gpu.py) in interpret mode on CPU.

Checked against the pure-jnp references (pallas_kernels/ltis_reference.py) and against brute-force oracles
written here from the SPEC (a float64 numpy selection oracle and a dense [N, N]-mask attention oracle):
selection kept-sets (with several scoring chunks and query-tile sizes), outputs and gradients w.r.t. q, k, v
(random cotangent), float32 and bfloat16, causal and bidirectional, mask_padded_block_keys on/off, N in
{1, 5, 16, 17, 50, 130}, n larger than the number of visible blocks, GQA G in {1, 2, 4, 8}, right padding with
a one-item row, NaN at padded positions.
Plus a CUDA lowering check through ``jax.export`` (no GPU needed).

Interpret mode compiles slowly, so the jitted entry points are shared module-level functions (one compile per
distinct shape / static configuration) and each configuration checks as much as it can.
"""

from __future__ import annotations

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import gpu_common, ltis_gpu, ltis_reference

BLOCK = 16
THR = 1e-10


# ------------------------------------------------------------------------------------------------------
# shared jitted entry points
# ------------------------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("causal", "n_sel"))
def _select_kernel(qm, ck, bv, *, causal, n_sel):
    scale = 1.0 / math.sqrt(qm.shape[-1])
    return ltis_gpu.select_blocks_gpu(qm, ck, bv, causal=causal, num_selected=n_sel, block_size=BLOCK,
                                      keep_threshold=THR, scale=scale, interpret=True)


@functools.partial(jax.jit, static_argnames=("causal", "n_sel"))
def _select_ref(qm, ck, bv, *, causal, n_sel):
    scale = 1.0 / math.sqrt(qm.shape[-1])
    return ltis_reference.select_blocks_reference(qm, ck, bv, causal=causal, num_selected=n_sel,
                                                  block_size=BLOCK, keep_threshold=THR, scale=scale)


def _value_and_grads(attn_fn, q, k, v, valid, sel, kept, ct, **kw):
    o, vjp = jax.vjp(lambda q_, k_, v_: attn_fn(q_, k_, v_, valid, sel, kept, block_size=BLOCK, **kw),
                     q, k, v)
    return (o, *vjp(ct.astype(o.dtype)))


@functools.partial(jax.jit, static_argnames=("causal", "mask_padded"))
def _attn_kernel(q, k, v, valid, sel, kept, ct, *, causal, mask_padded):
    fn = functools.partial(ltis_gpu.ltis_attention_gpu, interpret=True)
    return _value_and_grads(fn, q, k, v, valid, sel, kept, ct, causal=causal,
                            mask_padded_block_keys=mask_padded)


@functools.partial(jax.jit, static_argnames=("causal", "mask_padded"))
def _attn_ref(q, k, v, valid, sel, kept, ct, *, causal, mask_padded):
    return _value_and_grads(ltis_reference.ltis_attention_reference, q, k, v, valid, sel, kept, ct,
                            causal=causal, mask_padded_block_keys=mask_padded)


# ------------------------------------------------------------------------------------------------------
# brute-force oracles (from the SPEC text)
# ------------------------------------------------------------------------------------------------------
def _oracle_select(qm, ck, bv, *, causal, n_sel, block_size=BLOCK, thr=THR):
    """float64 numpy: per (b, i, h) the set of kept blocks and the p of every block."""
    qm = np.asarray(qm, np.float64)
    ck = np.asarray(ck, np.float64)
    bv = np.asarray(bv, bool)
    bsz, n, hk, d = qm.shape
    nc = ck.shape[2]
    scale = 1.0 / math.sqrt(d)
    kept_sets = {}
    probs = np.zeros((bsz, n, hk, nc))
    for b in range(bsz):
        for h in range(hk):
            for i in range(n):
                vis = [w for w in range(nc) if bv[b, w] and (not causal or w * block_size + block_size - 1 < i)]
                s = np.array([qm[b, i, h] @ ck[b, h, w] * scale for w in vis])
                if len(vis):
                    mx = max(-1000.0, s.max())
                    den = math.exp(-1000.0 - mx) + np.exp(s - mx).sum()
                    p = np.exp(s - mx) / den
                    probs[b, i, h, vis] = p
                    order = np.argsort(-p, kind="stable")[: min(n_sel, nc)]
                    kept_sets[b, i, h] = {vis[o] for o in order if p[o] > thr}
                else:
                    kept_sets[b, i, h] = set()
    return kept_sets, probs


def _oracle_mask(valid, sel, kept, *, causal, mask_padded, block_size=BLOCK):
    """Dense key mask [B, Hk, N, N] of SPEC 3.5 / 3.8 (numpy)."""
    valid = np.asarray(valid, bool)
    sel = np.asarray(sel)
    kept = np.asarray(kept, bool)
    bsz, n, hk, n_sel = sel.shape
    j = np.arange(n)
    mask = np.zeros((bsz, hk, n, n), bool)
    for b in range(bsz):
        for h in range(hk):
            for i in range(n):
                if not valid[b, i]:
                    continue
                row = np.zeros(n, bool)
                for r in range(n_sel):
                    if kept[b, i, h, r]:
                        blk = (j // block_size == sel[b, i, h, r])
                        row |= blk & valid[b] if mask_padded else blk
                if causal:
                    row |= (j // block_size == i // block_size) & (j <= i) & valid[b]
                mask[b, h, i] = row
    return mask


@functools.partial(jax.jit, static_argnames=())
def _dense_oracle(q, k, v, mask, valid, ct):
    """Dense masked attention with GQA; rows with an empty key set (or invalid queries) give 0."""

    def f(q, k, v):
        bsz, n, h, d = q.shape
        hk = k.shape[2]
        g = h // hk
        qf = q.astype(jnp.float32).reshape(bsz, n, hk, g, d)
        s = jnp.einsum("bihgd,bjhd->bhgij", qf, k.astype(jnp.float32),
                       precision=jax.lax.Precision.HIGHEST) / math.sqrt(d)
        m = mask[:, :, None]
        s = jnp.where(m, s, -jnp.inf)
        mx = jax.lax.stop_gradient(jnp.max(s, -1, keepdims=True))
        mx = jnp.where(jnp.isfinite(mx), mx, 0.0)
        e = jnp.where(m, jnp.exp(s - mx), 0.0)
        den = e.sum(-1, keepdims=True)
        p = e / jnp.where(den > 0, den, 1.0)
        o = jnp.einsum("bhgij,bjhd->bihgd", p, v.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
        return o.reshape(bsz, n, h, d) * valid[:, :, None, None]

    o, vjp = jax.vjp(f, q, k, v)
    return (o, *vjp(ct.astype(jnp.float32)))


# ------------------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------------------
def _valid(n, lens):
    return np.arange(n)[None, :] < np.asarray(lens)[:, None]


def _random_selection(rng, valid, hk, n_sel, *, causal, block_size=BLOCK):
    """Random distinct visible blocks per (b, i, h) (what the selection could return), ~80 % kept.

    Unfilled slots: index 0, kept False. Invalid queries get arbitrary kept blocks (must be ignored)."""
    bsz, n = valid.shape
    nc = n // block_size
    bvalid = np.array([[valid[b, w * block_size:(w + 1) * block_size].any() for w in range(nc)]
                       for b in range(bsz)]).reshape(bsz, nc)
    sel = np.zeros((bsz, n, hk, n_sel), np.int32)
    kept = np.zeros((bsz, n, hk, n_sel), bool)
    for b in range(bsz):
        for i in range(n):
            for h in range(hk):
                if not valid[b, i]:
                    if nc:
                        sel[b, i, h] = rng.integers(0, nc, n_sel)
                        kept[b, i, h] = True
                    continue
                vis = [w for w in range(nc) if bvalid[b, w] and (not causal or w * block_size + block_size - 1 < i)]
                m = min(n_sel, len(vis))
                if m:
                    pick = rng.choice(vis, m, replace=False)
                    sel[b, i, h, :m] = pick
                    kept[b, i, h, :m] = rng.random(m) < 0.8
    return sel, kept, bvalid


def _qkv(rng, bsz, n, h, hk, d, dtype):
    q = rng.standard_normal((bsz, n, h, d)).astype(np.float32)
    k = rng.standard_normal((bsz, n, hk, d)).astype(np.float32)
    v = rng.standard_normal((bsz, n, hk, d)).astype(np.float32)
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def _close(a, b, tol, what):
    a = np.asarray(jnp.asarray(a, jnp.float32))
    b = np.asarray(jnp.asarray(b, jnp.float32))
    assert a.shape == b.shape, what
    assert np.isfinite(a).all(), f"{what}: non-finite values"
    scale = max(1.0, float(np.abs(b).max()))
    err = float(np.abs(a - b).max())
    assert err <= tol * scale, f"{what}: max abs err {err:.3g} > {tol:.1g} * {scale:.3g}"


# ------------------------------------------------------------------------------------------------------
# selection
# ------------------------------------------------------------------------------------------------------
SELECT_CASES = [
    # (N, Hk, causal, n_sel)
    (1, 2, True, 4),
    (5, 1, False, 4),
    (16, 2, True, 4),  # Nc = 1, nothing visible in causal mode
    (17, 2, True, 4),  # Nc = 1, n > Nc
    (50, 2, True, 4),
    (50, 1, True, 8),  # n larger than the number of visible blocks
    (130, 2, True, 4),
    (50, 2, False, 3),
    (130, 1, False, 4),
]


@pytest.mark.parametrize("n,hk,causal,n_sel", SELECT_CASES)
def test_select_blocks(n, hk, causal, n_sel):
    _check_selection(n, hk, causal, n_sel)


@pytest.mark.parametrize("n,causal,chunk,block_q,longest_first", [
    (600, True, 16, 16, 0), (300, False, 64, 128, 1), (700, True, 16, 64, 1), (130, True, 32, 32, 0),
    (1000, True, 32, 128, 0), (1000, True, 32, 128, 1)])
def test_select_chunks_and_query_tiles(monkeypatch, n, causal, chunk, block_q, longest_first):
    """Scoring chunks that do not divide the visible block count (the blocks past it are masked), several
    chunks per query, query tiles smaller / larger than N, and tiles launched longest first."""
    monkeypatch.setattr(ltis_gpu, "SEL_CHUNK", chunk)
    monkeypatch.setattr(ltis_gpu, "SEL_BLOCK_Q", block_q)
    monkeypatch.setattr(ltis_gpu, "SEL_LONGEST_FIRST", longest_first)
    jax.clear_caches()
    try:
        _check_selection(n, 2, causal, 4)
    finally:
        jax.clear_caches()


def _check_selection(n, hk, causal, n_sel):
    rng = np.random.default_rng(1000 + n * 7 + hk + 3 * causal + n_sel)
    bsz, d = 2, 16
    nc = n // BLOCK
    lens = [n, max(1, n - 23)]
    valid = _valid(n, lens)
    qm = rng.standard_normal((bsz, n, hk, d)).astype(np.float32)
    # large compressed keys -> peaky p, so some selected blocks fall under the keep threshold
    ck = (rng.standard_normal((bsz, hk, nc, d)) * rng.choice([1.0, 30.0], (bsz, hk, nc, 1))).astype(np.float32)
    bv = np.array([[valid[b, w * BLOCK:(w + 1) * BLOCK].any() for w in range(nc)] for b in range(bsz)],
                  bool).reshape(bsz, nc)
    if nc >= 3:
        bv[0, 1] = False  # an invalid block in the middle: never visible
    # NaN must not matter where it cannot be seen: invalid blocks' keys
    ck_nan = np.where(bv[:, None, :, None], ck, np.nan).astype(np.float32)

    sel, kept = _select_kernel(jnp.asarray(qm), jnp.asarray(ck_nan), jnp.asarray(bv), causal=causal,
                               n_sel=n_sel)
    sel_r, kept_r = _select_ref(jnp.asarray(qm), jnp.asarray(ck), jnp.asarray(bv), causal=causal,
                                n_sel=n_sel)
    sel, kept, sel_r, kept_r = map(np.asarray, (sel, kept, sel_r, kept_r))
    assert sel.shape == kept.shape == (bsz, n, hk, n_sel) and sel.dtype == np.int32 and kept.dtype == bool
    oracle, probs = _oracle_select(qm, ck, bv, causal=causal, n_sel=n_sel)
    n_kept_total = 0
    for (b, i, h), want in oracle.items():
        got = {int(s) for s, kp in zip(sel[b, i, h], kept[b, i, h]) if kp}
        ref = {int(s) for s, kp in zip(sel_r[b, i, h], kept_r[b, i, h]) if kp}
        assert got == want, (b, i, h, got, want)
        assert ref == want, (b, i, h, ref, want)
        assert int(kept[b, i, h].sum()) == len(got)  # kept blocks are distinct
        n_kept_total += len(got)
        # every slot index is a real block (or 0 when there is none)
        assert ((sel[b, i, h] >= 0) & (sel[b, i, h] < max(nc, 1))).all()
        # kept slots are the highest-p ones
        if got:
            assert min(probs[b, i, h, list(got)]) > THR
    if n_sel > nc:
        assert not kept[..., nc:].any() and (sel[..., nc:] == 0).all()
    if nc > 1 and causal:
        assert n_kept_total > 0
    if n >= 130:
        # the threshold did bite somewhere: a visible, selected block that is not kept
        assert (~kept & (probs.max(-1, keepdims=True) > 0)).any()


# ------------------------------------------------------------------------------------------------------
# fine attention
# ------------------------------------------------------------------------------------------------------
ATTN_CASES = [
    # (N, H, Hk, n_sel, causal, mask_padded, dtype, lens)
    (50, 8, 2, 4, True, False, jnp.float32, [50, 37, 1]),  # G = 4, right padding + one-item row
    (50, 8, 2, 4, False, False, jnp.float32, [50, 37, 1]),
    (50, 8, 2, 3, False, True, jnp.float32, [50, 37, 1]),  # n not a power of two
    (130, 4, 2, 4, True, True, jnp.float32, [130, 71]),  # G = 2 (two slot groups)
    (17, 8, 1, 4, True, False, jnp.float32, [17, 16]),  # G = 8, Nc = 1, n > Nc
    (16, 2, 2, 4, False, False, jnp.float32, [16, 9]),  # G = 1, Nc = 1 bidirectional
    (5, 2, 2, 4, True, False, jnp.float32, [5, 3]),  # G = 1, Nc = 0: own block only
    (1, 4, 1, 4, False, False, jnp.float32, [1]),  # Nc = 0 bidirectional: output 0
    (130, 8, 2, 4, True, False, jnp.bfloat16, [130, 100]),
    (50, 4, 2, 6, False, True, jnp.bfloat16, [50, 20]),  # n = 6 > visible blocks (3 slot groups)
]


@pytest.mark.parametrize("n,h,hk,n_sel,causal,mask_padded,dtype,lens", ATTN_CASES)
def test_attention_vs_reference_and_oracle(n, h, hk, n_sel, causal, mask_padded, dtype, lens):
    rng = np.random.default_rng(7 * n + h + 31 * hk + 2 * causal + mask_padded)
    bsz, d = len(lens), 16
    valid_np = _valid(n, lens)
    sel, kept, _ = _random_selection(rng, valid_np, hk, n_sel, causal=causal)
    q, k, v = _qkv(rng, bsz, n, h, hk, d, dtype)
    ct = jnp.asarray(rng.standard_normal((bsz, n, h, d)).astype(np.float32))
    valid = jnp.asarray(valid_np)
    args = (q, k, v, valid, jnp.asarray(sel), jnp.asarray(kept), ct)
    out_k = _attn_kernel(*args, causal=causal, mask_padded=mask_padded)
    out_r = _attn_ref(*args, causal=causal, mask_padded=mask_padded)
    mask = jnp.asarray(_oracle_mask(valid_np, sel, kept, causal=causal, mask_padded=mask_padded))
    out_o = _dense_oracle(q, k, v, mask, valid, ct)
    assert out_k[0].dtype == dtype and out_k[1].dtype == dtype and out_k[2].dtype == dtype

    tol = 2e-5 if dtype == jnp.float32 else 3e-2
    for name, a, r, o in zip(("o", "dq", "dk", "dv"), out_k, out_r, out_o):
        _close(a, r, tol, f"{name} kernel vs reference")
        _close(a, o, tol, f"{name} kernel vs dense oracle")
        if dtype == jnp.float32:
            _close(r, o, 1e-5, f"{name} reference vs dense oracle")
    o = np.asarray(out_k[0].astype(jnp.float32))
    assert (o[~valid_np] == 0).all(), "output at padded queries must be exactly 0"
    assert (np.asarray(out_k[1].astype(jnp.float32))[~valid_np] == 0).all(), "dq at padded queries"
    if n < BLOCK and not causal:
        assert (o == 0).all()  # Nc = 0, bidirectional: empty key sets


@pytest.mark.parametrize("causal,mask_padded", [(True, False), (False, True)])
@pytest.mark.parametrize("constant", ["KV_HEAD_MAJOR", "DKV_BLOCKS_OUTER"])
def test_layouts_and_launch_orders_give_identical_results(monkeypatch, causal, mask_padded, constant):
    """The kernels read K / V head-major ([B, Hk, N, d], ``KV_HEAD_MAJOR``) or in the model's [B, N, Hk, d], and
    the dK/dV grid runs key blocks outermost or innermost (``DKV_BLOCKS_OUTER``): only addresses and launch order
    differ, so outputs and all gradients must be bitwise equal (G = 2: four slot groups)."""
    rng = np.random.default_rng(11 + causal)
    n, h, hk, n_sel, lens = 130, 4, 2, 4, [130, 71]
    valid_np = _valid(n, lens)
    sel, kept, _ = _random_selection(rng, valid_np, hk, n_sel, causal=causal)
    q, k, v = _qkv(rng, len(lens), n, h, hk, 16, jnp.float32)
    ct = jnp.asarray(rng.standard_normal(q.shape).astype(np.float32))
    args = (q, k, v, jnp.asarray(valid_np), jnp.asarray(sel), jnp.asarray(kept), ct)
    fn = functools.partial(ltis_gpu.ltis_attention_gpu, interpret=True)
    results = []
    for value in (1, 0):
        monkeypatch.setattr(ltis_gpu, constant, value)  # read at trace time: a fresh jit per value
        run = jax.jit(functools.partial(_value_and_grads, fn, causal=causal, mask_padded_block_keys=mask_padded))
        results.append(run(*args))
    for name, a, b in zip(("o", "dq", "dk", "dv"), *results):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
    if constant == "DKV_BLOCKS_OUTER":  # the grid the dK/dV kernel was launched with, per order
        grids = {}
        for value in (1, 0):
            monkeypatch.setattr(ltis_gpu, constant, value)
            jaxpr = jax.make_jaxpr(functools.partial(_value_and_grads, fn, causal=causal,
                                                     mask_padded_block_keys=mask_padded))(*args)
            grids[value] = [e.params["grid_mapping"].grid for e in _pallas_eqns(jaxpr.jaxpr)
                            if "dkv" in str(e.params.get("name_and_src_info", e.params.get("name", "")))]
        nkb = -(-n // BLOCK)
        assert grids == {1: [(len(lens), hk, nkb)], 0: [(nkb, len(lens), hk)]}, grids


def _pallas_eqns(jaxpr):
    """Every ``pallas_call`` equation of a jaxpr, nested ones (custom_vjp, pjit) included."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                if hasattr(sub, "eqns"):
                    yield from _pallas_eqns(sub)


def test_attention_nan_at_padding_does_not_leak():
    """Causal mode: NaN in q, k, v at padded positions changes nothing (outputs and gradients)."""
    rng = np.random.default_rng(5)
    n, h, hk, d, n_sel, lens = 50, 8, 2, 16, 4, [50, 37, 1]
    bsz = len(lens)
    valid_np = _valid(n, lens)
    sel, kept, _ = _random_selection(rng, valid_np, hk, n_sel, causal=True)
    q, k, v = _qkv(rng, bsz, n, h, hk, d, jnp.float32)
    ct = jnp.asarray(rng.standard_normal((bsz, n, h, d)).astype(np.float32))
    pad = jnp.asarray(~valid_np)[:, :, None, None]
    qn, kn, vn = (jnp.where(pad, jnp.nan, x) for x in (q, k, v))
    valid = jnp.asarray(valid_np)
    out_nan = _attn_kernel(qn, kn, vn, valid, jnp.asarray(sel), jnp.asarray(kept), ct, causal=True,
                           mask_padded=False)
    out_ref = _attn_ref(q, k, v, valid, jnp.asarray(sel), jnp.asarray(kept), ct, causal=True,
                        mask_padded=False)
    for name, a, r in zip(("o", "dq", "dk", "dv"), out_nan, out_ref):
        assert np.isfinite(np.asarray(a)).all(), f"{name}: NaN leaked"
        _close(a, r, 2e-5, name)
    assert (np.asarray(out_nan[0])[~valid_np] == 0).all()


def test_select_then_attend_end_to_end():
    """Kernel selection -> kernel attention equals reference selection -> reference attention (causal)."""
    rng = np.random.default_rng(11)
    n, h, hk, d, lens = 130, 4, 2, 16, [130, 71]
    bsz = len(lens)
    valid_np = _valid(n, lens)
    q, k, v = _qkv(rng, bsz, n, h, hk, d, jnp.float32)
    nc = n // BLOCK
    qm = q.reshape(bsz, n, hk, h // hk, d).mean(3)
    ck = jnp.asarray(rng.standard_normal((bsz, hk, nc, d)).astype(np.float32) * 4)
    bv = jnp.asarray(np.array([[valid_np[b, w * BLOCK:(w + 1) * BLOCK].any() for w in range(nc)]
                               for b in range(bsz)]))
    sel, kept = _select_kernel(qm, ck, bv, causal=True, n_sel=4)
    sel_r, kept_r = _select_ref(qm, ck, bv, causal=True, n_sel=4)
    ct = jnp.asarray(rng.standard_normal((bsz, n, h, d)).astype(np.float32))
    valid = jnp.asarray(valid_np)
    out_k = _attn_kernel(q, k, v, valid, sel, kept, ct, causal=True, mask_padded=True)
    out_r = _attn_ref(q, k, v, valid, sel_r, kept_r, ct, causal=True, mask_padded=True)
    for name, a, r in zip(("o", "dq", "dk", "dv"), out_k, out_r):
        _close(a, r, 2e-5, name)


def test_dkv_is_deterministic():
    rng = np.random.default_rng(3)
    n, h, hk, d, lens = 50, 8, 2, 16, [50, 37, 1]
    valid_np = _valid(n, lens)
    sel, kept, _ = _random_selection(rng, valid_np, hk, 4, causal=True)
    q, k, v = _qkv(rng, len(lens), n, h, hk, d, jnp.float32)
    ct = jnp.asarray(rng.standard_normal(q.shape).astype(np.float32))
    args = (q, k, v, jnp.asarray(valid_np), jnp.asarray(sel), jnp.asarray(kept), ct)
    a = _attn_kernel(*args, causal=True, mask_padded=False)
    b = _attn_kernel(*args, causal=True, mask_padded=False)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("sort", ["u16", "flat", "per_row", "pairs"])
def test_inverse_selection_matches_a_stable_argsort(monkeypatch, sort):
    """The dK/dV kernel's inverse map: pair ids stably sorted by kept block (unkept slots and padded
    queries last) and each block's segment start (blocks nobody selected included), against numpy; for the
    (uint16 segment, id) pair sort of all rows, the one 1-D sort of all rows' packed keys, the per-row packed
    sort, and the (key, id) sort used when a packed key would overflow int32."""
    if sort != "u16":
        monkeypatch.setattr(ltis_gpu, "DKV_SORT_U16_KEYS", 0)
    # each case on its own path: this test's 210 pairs per row are below the production flat-sort threshold
    monkeypatch.setattr(ltis_gpu, "DKV_FLAT_SORT_MIN_PAIRS", 2**31 - 1 if sort == "per_row" else 1)
    if sort == "pairs":
        monkeypatch.setattr(ltis_gpu, "_PACKED_SORT_MAX", 0)
    rng = np.random.default_rng(5)
    bsz, n, hk, n_sel = 2, 70, 2, 3
    nkb = -(-n // BLOCK)
    sel_enc = rng.integers(-1, nkb, size=(bsz, n, hk, n_sel)).astype(np.int32)
    sel_enc[0, 5] = 2  # many pairs on one block
    sel_enc[1, :, 0] = np.where(np.isin(sel_enc[1, :, 0], [1, 3]), 0, sel_enc[1, :, 0])  # blocks nobody selected
    valid = np.ones((bsz, n), np.int32)
    valid[1, 40:] = 0
    args = (jnp.asarray(valid), jnp.asarray(sel_enc), nkb)

    def inverse_selection(*a):  # a new function per case: jax caches traces per function, not per module constant
        return ltis_gpu._inverse_selection(*a)

    sorts = [e for e in jax.make_jaxpr(inverse_selection, static_argnums=2)(*args).eqns if e.primitive.name == "sort"]
    assert len(sorts) == 1
    operands = [(str(x.aval.dtype), x.aval.ndim) for x in sorts[0].invars]
    assert operands == {"u16": [("uint16", 1), ("int32", 1)], "flat": [("int32", 1)],
                        "per_row": [("int32", 3)], "pairs": [("int32", 3), ("int32", 3)]}[sort]
    order, starts = map(np.asarray, jax.jit(inverse_selection, static_argnums=2)(*args))
    for b in range(bsz):
        for h in range(hk):
            keys = np.where((sel_enc[b, :, h] >= 0) & (valid[b, :, None] != 0), sel_enc[b, :, h], nkb).reshape(-1)
            want = np.argsort(keys, kind="stable")
            np.testing.assert_array_equal(order[b, h], want)
            np.testing.assert_array_equal(starts[b, h], np.searchsorted(keys[want], np.arange(nkb + 1)))


def test_head_dim_padding_and_argument_checks():
    """d = 8 (< 16) is zero-padded inside the wrapper with the 1/sqrt(8) scale kept."""
    rng = np.random.default_rng(4)
    n, h, hk, d, lens = 17, 2, 1, 8, [17, 10]
    valid_np = _valid(n, lens)
    sel, kept, _ = _random_selection(rng, valid_np, hk, 2, causal=True)
    q, k, v = _qkv(rng, len(lens), n, h, hk, d, jnp.float32)
    ct = jnp.asarray(rng.standard_normal(q.shape).astype(np.float32))
    args = (q, k, v, jnp.asarray(valid_np), jnp.asarray(sel), jnp.asarray(kept), ct)
    for name, a, r in zip(("o", "dq", "dk", "dv"), _attn_kernel(*args, causal=True, mask_padded=False),
                          _attn_ref(*args, causal=True, mask_padded=False)):
        _close(a, r, 2e-5, name)
    with pytest.raises(ValueError):
        ltis_gpu.ltis_attention_gpu(q, k, v, jnp.asarray(valid_np), jnp.asarray(sel), jnp.asarray(kept),
                                    block_size=12)


# ------------------------------------------------------------------------------------------------------
# CUDA lowering without a GPU
# ------------------------------------------------------------------------------------------------------
def _launch_params(mlir_text: str) -> dict[str, tuple[int, int]]:
    """{kernel name: (num_stages, num_warps)} of the Triton custom calls in a lowered module (the backend config
    jaxlib 0.10.x writes: attributes sorted by name, so ``name`` is followed by ``num_stages`` and ``num_warps``)."""
    found = re.findall(r'name = "(\w+)", num_stages = (\d+) : i32, num_warps = (\d+) : i32', mlir_text)
    return {name: (int(stages), int(warps)) for name, stages, warps in found}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
def test_cuda_export_lowering(dtype, causal):
    """Selection, forward and gradient lower to Triton custom calls for platform 'cuda' on a CPU jaxlib."""
    bsz, n, h, hk, d, n_sel = 2, 130, 8, 2, 16, 4
    sds = jax.ShapeDtypeStruct
    disabled = [jax.export.DisabledSafetyCheck.custom_call(ltis_gpu.TRITON_CUSTOM_CALL_TARGET)]
    attn_args = (sds((bsz, n, h, d), dtype), sds((bsz, n, hk, d), dtype), sds((bsz, n, hk, d), dtype),
                 sds((bsz, n), jnp.bool_), sds((bsz, n, hk, n_sel), jnp.int32), sds((bsz, n, hk, n_sel), jnp.bool_))

    def fwd(q, k, v, valid, sel, kept):
        return ltis_gpu.ltis_attention_gpu(q, k, v, valid, sel, kept, causal=causal)

    def grad(q, k, v, valid, sel, kept):
        return jax.grad(lambda *a: jnp.sum(fwd(*a, valid, sel, kept).astype(jnp.float32)),
                        argnums=(0, 1, 2))(q, k, v)

    def select(qm, ck, bv):
        return ltis_gpu.select_blocks_gpu(qm, ck, bv, causal=causal, num_selected=n_sel, scale=0.25)

    sel_args = (sds((bsz, n, hk, d), jnp.float32), sds((bsz, hk, n // BLOCK, d), dtype),
                sds((bsz, n // BLOCK), jnp.bool_))
    params = {}
    for fn, args, n_calls in ((select, sel_args, 1),
                              (fwd, attn_args, 1), (grad, attn_args, 3)):
        exported = jax.export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=disabled)(*args)
        text = exported.mlir_module()
        assert text.count(ltis_gpu.TRITON_CUSTOM_CALL_TARGET) == n_calls, fn.__name__
        params.update(_launch_params(text))
    # every kernel launches with its module constants (the tuned warps / pipeline depths reach the custom calls)
    assert params == {"ltis_select": (ltis_gpu.SEL_NUM_STAGES, ltis_gpu.SEL_NUM_WARPS),
                      "ltis_attention_fwd": (gpu_common.NUM_STAGES, ltis_gpu.ATTN_NUM_WARPS),
                      "ltis_attention_dq": (gpu_common.NUM_STAGES, ltis_gpu.DQ_NUM_WARPS),
                      "ltis_attention_dkv": (ltis_gpu.DKV_NUM_STAGES, ltis_gpu.DKV_NUM_WARPS)}
