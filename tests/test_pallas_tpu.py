"""Tests of the Pallas TPU (Mosaic) kernels ``pallas_kernels.stis_tpu`` / ``ltis_tpu`` on a CPU-only host.

1. TPU interpret mode (``pltpu.InterpretParams``) against brute-force dense-mask oracles
   written here (N x N masks: test sizes only): outputs and gradients w.r.t. q, k, v, float32 and bfloat16,
   causal and bidirectional, padding including a row with one valid item, odd N, N < 16, GQA groups
   G in {1, 2, 4, 8}, multi-tile grids (small ``block_rows``). The race detector (``detect_races=True``) runs
   on the selection cases and on a causal and a bidirectional multi-tile case per attention kernel: every kernel
   it watches must report no race.
2. Ahead-of-time compilation (Mosaic, the real TPU compiler in libtpu) for TPU v5e and v6e topologies of
   jitted forward+backward functions at a realistic shape, which catches layout / VMEM errors that interpret
   mode cannot. Skipped with a reason when libtpu (``jax[tpu]``) is not installed.
"""
from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.ltis_tpu import ltis_attention_tpu, select_blocks_tpu
from pallas_kernels.stis_tpu import stis_attention_tpu

try:  # private: lets the test see the race detector of every interpreted kernel, not only the last one
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call as _ipc
except Exception:  # pragma: no cover
    _ipc = None

INTERPRET = pltpu.InterpretParams(detect_races=True)
# Race detection triples an interpreted kernel's time; the attention cases run it on a causal and a bidirectional
# case per kernel (multi-tile grids included), the others interpret without it.
INTERPRET_NO_RACE_CHECK = pltpu.InterpretParams()


@pytest.fixture
def race_states(monkeypatch):
    """Collects the RaceDetectionState of every interpreted kernel launched during the test."""
    states = []
    if _ipc is not None and hasattr(_ipc, "RaceDetectionState"):
        orig = _ipc.RaceDetectionState

        class _Recording(orig):
            def __init__(self, *a, **kw):
                super().__init__(*a, **kw)
                states.append(self)

        monkeypatch.setattr(_ipc, "RaceDetectionState", _Recording)
    yield states
    if _ipc is not None:
        pltpu.reset_tpu_interpret_mode_state()


def _assert_no_races(states, checked=True):
    if not checked:
        return
    if _ipc is None:
        pytest.skip("cannot reach the interpret-mode race detector in this jax version")
    assert states, "race detection did not run"
    assert not any(s.races_found for s in states), "Pallas TPU interpret mode detected a data race"


# ----------------------------------------------------------------------------------------------
# brute-force oracles (dense N x N masks; test sizes only)
# ----------------------------------------------------------------------------------------------
def _dense_attention(q, k, v, count):
    """Softmax attention where key j of query i counts ``count[b, h, i, j]`` times (0 = masked).

    q [B, N, H, d], k/v [B, N, Hk, d], count [B, Hk, N, N] -> o [B, N, H, d] float32, 0 for empty rows."""
    b, n, h, d = q.shape
    hk = k.shape[2]
    g = h // hk
    qf = q.astype(jnp.float32).reshape(b, n, hk, g, d)
    s = jnp.einsum("bihgd,bjhd->bhgij", qf, k.astype(jnp.float32),
                   precision=lax.Precision.HIGHEST) / math.sqrt(d)
    c = jnp.asarray(count, jnp.float32)[:, :, None]
    s = jnp.where(c > 0, s + jnp.log(jnp.maximum(c, 1.0)), -jnp.inf)
    m = lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    e = jnp.where(c > 0, jnp.exp(s - m), 0.0)
    den = jnp.sum(e, axis=-1, keepdims=True)
    p = e / jnp.where(den > 0, den, 1.0)
    o = jnp.einsum("bhgij,bjhd->bihgd", p, v.astype(jnp.float32), precision=lax.Precision.HIGHEST)
    return o.reshape(b, n, h, d)


def _stis_count(valid, hk, causal, window, sink):
    valid = np.asarray(valid, bool)
    n = valid.shape[1]
    i = np.arange(n)[:, None]
    j = np.arange(n)[None, :]
    dlt = i - j
    pow2 = (dlt > 0) & ((dlt & (dlt - 1)) == 0)
    if causal:
        m = (dlt >= 0) & ((dlt < window) | pow2)
    else:
        m = (np.abs(dlt) < window) | pow2
        if sink:
            m = m | (j == n - 1)
    m = m[None] & valid[:, :, None] & valid[:, None, :]
    return np.broadcast_to(m[:, None], (valid.shape[0], hk, n, n)).astype(np.float32)


def _ltis_count(valid, sel, kept, causal, bsz, mask_padded):
    valid = np.asarray(valid, bool)
    sel = np.asarray(sel)
    kept = np.asarray(kept, bool)
    b, n, hk, ns = sel.shape
    cnt = np.zeros((b, hk, n, n), np.float32)
    for bb in range(b):
        for i in range(n):
            if not valid[bb, i]:
                continue
            for h in range(hk):
                for r in range(ns):
                    if kept[bb, i, h, r]:
                        for j in range(sel[bb, i, h, r] * bsz, min(sel[bb, i, h, r] * bsz + bsz, n)):
                            if valid[bb, j] or not mask_padded:
                                cnt[bb, h, i, j] += 1
                if causal:
                    for j in range(i // bsz * bsz, i + 1):
                        cnt[bb, h, i, j] += valid[bb, j]
    return cnt


def _select_oracle(q_mean, ck, block_valid, causal, n_sel, bsz, thr, scale):
    b, n, hk, _ = q_mean.shape
    nc = ck.shape[2]
    s = jnp.einsum("bnhd,bhwd->bhnw", q_mean.astype(jnp.float32), ck.astype(jnp.float32),
                   precision=lax.Precision.HIGHEST) * scale
    vis = jnp.asarray(block_valid, bool)[:, None, None, :]
    if causal:
        vis = vis & (jnp.arange(nc)[None, :] * bsz + bsz - 1 < jnp.arange(n)[:, None])[None, None]
    s = jnp.where(vis, s, -jnp.inf)
    p = jax.nn.softmax(jnp.concatenate([jnp.full(s.shape[:-1] + (1,), -1000.0), s], -1), -1)[..., 1:]
    k_eff = min(n_sel, nc)
    vals, idx = lax.top_k(p, k_eff)
    kept = vals > thr
    pad = ((0, 0),) * 3 + ((0, n_sel - k_eff),)
    idx, kept = jnp.pad(idx, pad), jnp.pad(kept, pad)
    return jnp.transpose(idx, (0, 2, 1, 3)).astype(jnp.int32), jnp.transpose(kept, (0, 2, 1, 3))


def _inputs(seed, b, n, h, hk, d, dtype, lens):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(ks[0], (b, n, h, d), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (b, n, hk, d), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (b, n, hk, d), jnp.float32).astype(dtype)
    do = jax.random.normal(ks[3], (b, n, h, d), jnp.float32).astype(dtype)
    valid = jnp.arange(n)[None, :] < jnp.asarray(lens)[:, None]
    return q, k, v, do, valid


def _jitted_value_and_vjp(f):
    """jit(q, k, v, do -> (f(q, k, v), its VJP applied to do)): one compilation instead of an op-by-op one."""
    def value_and_vjp(q, k, v, do):
        o, vjp = jax.vjp(f, q, k, v)
        return o, vjp(do)

    return jax.jit(value_and_vjp)


def _check_vjp(f, oracle, q, k, v, do, dtype):
    o, grads = _jitted_value_and_vjp(f)(q, k, v, do)
    o_ref, grads_ref = _jitted_value_and_vjp(oracle)(q.astype(jnp.float32), k.astype(jnp.float32),
                                                     v.astype(jnp.float32), do.astype(jnp.float32))
    assert o.dtype == q.dtype and o.shape == q.shape
    tol = dict(atol=2e-5, rtol=2e-5) if dtype == jnp.float32 else dict(atol=3e-2, rtol=3e-2)
    for name, a, r in zip(("o", "dq", "dk", "dv"), (o,) + tuple(grads), (o_ref,) + tuple(grads_ref)):
        a = np.asarray(a.astype(jnp.float32))
        assert np.all(np.isfinite(a)), name
        np.testing.assert_allclose(a, np.asarray(r), err_msg=name, **tol)


# ----------------------------------------------------------------------------------------------
# 1. interpret mode (the race detector on the cases that ask for it)
# ----------------------------------------------------------------------------------------------
STIS_CASES = [
    # (B, N, H, Hk, dtype, causal, lens, block_rows, race check)
    pytest.param(2, 37, 8, 2, jnp.float32, True, [37, 1], None, False, id="f32-causal-G4-oddN-onevalid"),
    pytest.param(2, 13, 4, 4, jnp.bfloat16, False, [13, 9], None, False, id="bf16-bidir-G1-N13"),
    pytest.param(2, 70, 8, 1, jnp.float32, True, [70, 41], 16, True, id="f32-causal-G8-multitile"),
    pytest.param(1, 45, 2, 1, jnp.float32, False, [45], 16, True, id="f32-bidir-G2-multitile-sink"),
]


@pytest.mark.slow
@pytest.mark.parametrize("b,n,h,hk,dtype,causal,lens,block_rows,race_check", STIS_CASES)
def test_stis_interpret(race_states, b, n, h, hk, dtype, causal, lens, block_rows, race_check):
    d = 16
    q, k, v, do, valid = _inputs(1, b, n, h, hk, d, dtype, lens)
    cnt = _stis_count(valid, hk, causal, 8, True)

    def f(q, k, v):
        return stis_attention_tpu(q, k, v, valid, causal=causal, window=8, sink=True,
                                  interpret=INTERPRET if race_check else INTERPRET_NO_RACE_CHECK,
                                  block_rows=block_rows)

    _check_vjp(f, lambda q, k, v: _dense_attention(q, k, v, cnt), q, k, v, do, dtype)
    _assert_no_races(race_states, race_check)


LTIS_CASES = [
    # (B, N, H, Hk, dtype, causal, lens, mask_padded, block_rows, race check)
    pytest.param(2, 40, 8, 2, jnp.float32, True, [40, 1], False, None, False, id="f32-causal-G4-onevalid"),
    pytest.param(2, 45, 4, 1, jnp.bfloat16, False, [45, 23], True, None, False, id="bf16-bidir-G4-maskpad"),
    pytest.param(1, 50, 4, 2, jnp.float32, False, [37], False, 16, True, id="f32-bidir-G2-multitile"),
    pytest.param(1, 13, 8, 1, jnp.float32, True, [11], False, None, True, id="f32-causal-G8-N13-noblocks"),
]


@pytest.mark.slow
@pytest.mark.parametrize("b,n,h,hk,dtype,causal,lens,mask_padded,block_rows,race_check", LTIS_CASES)
def test_ltis_interpret(race_states, b, n, h, hk, dtype, causal, lens, mask_padded, block_rows, race_check):
    d, bsz, n_sel = 16, 16, 4
    q, k, v, do, valid = _inputs(2, b, n, h, hk, d, dtype, lens)
    nc = n // bsz
    ks = jax.random.split(jax.random.PRNGKey(3), 2)
    qm = jax.random.normal(ks[0], (b, n, hk, d))
    ck = 3.0 * jax.random.normal(ks[1], (b, hk, nc, d))
    bvalid = jnp.asarray(valid).reshape(b, -1)[:, :nc * bsz].reshape(b, nc, bsz).any(-1) if nc else \
        jnp.zeros((b, 0), bool)
    sel, kept = _select_oracle(qm, ck, bvalid, causal, n_sel, bsz, 1e-10, 0.25)
    cnt = _ltis_count(valid, sel, kept, causal, bsz, mask_padded)

    def f(q, k, v):
        return ltis_attention_tpu(q, k, v, valid, sel, kept, causal=causal, block_size=bsz,
                                  mask_padded_block_keys=mask_padded,
                                  interpret=INTERPRET if race_check else INTERPRET_NO_RACE_CHECK,
                                  block_rows=block_rows)

    _check_vjp(f, lambda q, k, v: _dense_attention(q, k, v, cnt), q, k, v, do, dtype)
    _assert_no_races(race_states, race_check)


SELECT_CASES = [
    # (B, N, Hk, causal, n_sel, block_rows)
    pytest.param(1, 2100, 1, True, 4, None, id="causal-2coltiles-skip"),
    pytest.param(2, 300, 2, False, 4, 64, id="bidir"),
    pytest.param(2, 40, 1, True, 4, None, id="causal-n_sel>Nc"),
]


@pytest.mark.parametrize("b,n,hk,causal,n_sel,block_rows", SELECT_CASES)
def test_select_interpret(race_states, b, n, hk, causal, n_sel, block_rows):
    d, bsz = 16, 16
    nc = n // bsz
    ks = jax.random.split(jax.random.PRNGKey(4), 3)
    qm = jax.random.normal(ks[0], (b, n, hk, d))
    ck = 3.0 * jax.random.normal(ks[1], (b, hk, nc, d))
    bv = jax.random.uniform(ks[2], (b, nc)) > 0.2
    sel, kept = select_blocks_tpu(qm, ck, bv, causal=causal, num_selected=n_sel, block_size=bsz,
                                  scale=0.25, interpret=INTERPRET, block_rows=block_rows)
    sel_r, kept_r = _select_oracle(qm, ck, bv, causal, n_sel, bsz, 1e-10, 0.25)
    assert sel.shape == (b, n, hk, n_sel) and sel.dtype == jnp.int32 and kept.dtype == jnp.bool_
    np.testing.assert_array_equal(np.asarray(kept), np.asarray(kept_r))
    np.testing.assert_array_equal(np.where(kept_r, sel, -1), np.where(kept_r, sel_r, -1))
    assert np.all((np.asarray(sel) >= 0) & (np.asarray(sel) < max(nc, 1)))
    if n_sel > nc:
        assert not np.any(np.asarray(kept)[..., nc:]) and not np.any(np.asarray(sel)[..., nc:])
    _assert_no_races(race_states)


def test_select_no_blocks():
    sel, kept = select_blocks_tpu(jnp.zeros((1, 9, 2, 16)), jnp.zeros((1, 2, 0, 16)), jnp.zeros((1, 0), bool),
                                  scale=0.25, interpret=INTERPRET)
    assert sel.shape == (1, 9, 2, 4) and not np.any(np.asarray(kept)) and not np.any(np.asarray(sel))


# ----------------------------------------------------------------------------------------------
# 2. AOT compile for TPU topologies (Mosaic)
# ----------------------------------------------------------------------------------------------
_HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
_TOPOS = {}


def _topology_device(name):
    from jax.experimental import topologies
    if name not in _TOPOS:
        try:
            _TOPOS[name] = topologies.get_topology_desc(name, "tpu").devices[0]
        except Exception as e:  # noqa: BLE001
            _TOPOS[name] = e
    dev = _TOPOS[name]
    if isinstance(dev, Exception):
        if "lockfile" in str(dev):  # a setup error, not a missing TPU generation: must not pass silently
            raise dev
        pytest.skip(f"libtpu cannot describe topology {name}: {dev}")
    return dev


def _aot_compile(fn, shapes, topology):
    dev = _topology_device(topology)
    sharding = jax.sharding.SingleDeviceSharding(dev)
    args = [jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding) for s in shapes]
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("tpu",)).compile()


_AOT_B, _AOT_N, _AOT_H, _AOT_HK, _AOT_D = 2, 1024, 8, 2, 16
_AOT_SKIP = pytest.mark.skipif(not _HAS_LIBTPU, reason="libtpu not installed (pip install 'jax[tpu]'): "
                               "AOT compilation for TPU topologies needs the Mosaic compiler from libtpu")
_AOT_CASES = [pytest.param("v5e:2x2", True, id="v5e-causal"), pytest.param("v5e:2x2", False, id="v5e-bidir"),
              pytest.param("v6e:2x2", True, id="v6e-causal")]


def _qkv_shapes(dtype=jnp.bfloat16):
    b, n, h, hk, d = _AOT_B, _AOT_N, _AOT_H, _AOT_HK, _AOT_D
    return [jax.ShapeDtypeStruct((b, n, h, d), dtype), jax.ShapeDtypeStruct((b, n, hk, d), dtype),
            jax.ShapeDtypeStruct((b, n, hk, d), dtype), jax.ShapeDtypeStruct((b, n), jnp.bool_)]


@_AOT_SKIP
@pytest.mark.parametrize("topology,causal", _AOT_CASES)
def test_aot_stis(topology, causal):
    def loss(q, k, v, valid):
        return jnp.sum(stis_attention_tpu(q, k, v, valid, causal=causal).astype(jnp.float32) ** 2)

    _aot_compile(jax.value_and_grad(loss, argnums=(0, 1, 2)), _qkv_shapes(), topology)


@_AOT_SKIP
@pytest.mark.parametrize("topology,causal", _AOT_CASES)
def test_aot_ltis(topology, causal):
    b, n, hk = _AOT_B, _AOT_N, _AOT_HK
    nc = n // 16

    def step(q, k, v, valid, q_mean, ck, block_valid):
        sel, kept = select_blocks_tpu(q_mean, ck, block_valid, causal=causal, scale=0.25)

        def loss(q, k, v):
            o = ltis_attention_tpu(q, k, v, valid, sel, kept, causal=causal)
            return jnp.sum(o.astype(jnp.float32) ** 2)

        return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)

    shapes = _qkv_shapes() + [jax.ShapeDtypeStruct((b, n, hk, 16), jnp.float32),
                              jax.ShapeDtypeStruct((b, hk, nc, 16), jnp.float32),
                              jax.ShapeDtypeStruct((b, nc), jnp.bool_)]
    _aot_compile(step, shapes, topology)
