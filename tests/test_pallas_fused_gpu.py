"""Fused short-sequence Pallas GPU kernel (pallas_kernels/fused_gpu.py) in interpret mode on CPU.

The kernel returns (o_ltis, o_stis); it must equal the pair of pure-jnp references
(ltis_reference.ltis_attention_reference, stis_reference.stis_attention_reference) in outputs and in the
gradients w.r.t. q, k, v for independent random cotangents of both outputs: float32 and bfloat16, causal and
bidirectional, mask_padded_block_keys on/off, N in {1, 5, 16, 17, 50, 70, 130}, GQA G in {1, 2, 4, 8}, right
padding with one-item and all-padding rows, n larger than the number of visible blocks, NaN at padded
positions, kept blocks as a bitmask and (forced) by comparison. Plus bitwise determinism of the backward and
the CUDA lowering through ``jax.export``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import fused_gpu, gpu_common, ltis_reference, stis_reference
from test_pallas_ltis_gpu import _close, _qkv, _random_selection, _valid


def _value_and_grads(fn, q, k, v, valid, sel, kept, ct_l, ct_s, **kw):
    (o_l, o_s), vjp = jax.vjp(lambda a, b, c: fn(a, b, c, valid, sel, kept, **kw), q, k, v)
    return (o_l, o_s, *vjp((ct_l.astype(o_l.dtype), ct_s.astype(o_s.dtype))))


@functools.partial(jax.jit, static_argnames=("causal", "mask_padded"))
def _kernel(q, k, v, valid, sel, kept, ct_l, ct_s, *, causal, mask_padded):
    fn = functools.partial(fused_gpu.fused_attention_gpu, interpret=True)
    return _value_and_grads(fn, q, k, v, valid, sel, kept, ct_l, ct_s, causal=causal,
                            mask_padded_block_keys=mask_padded)


def _pair_reference(q, k, v, valid, sel, kept, *, causal, mask_padded):
    o_l = ltis_reference.ltis_attention_reference(q, k, v, valid, sel, kept, causal=causal,
                                                  mask_padded_block_keys=mask_padded)
    return o_l, stis_reference.stis_attention_reference(q, k, v, valid, causal=causal)


@functools.partial(jax.jit, static_argnames=("causal", "mask_padded"))
def _reference(q, k, v, valid, sel, kept, ct_l, ct_s, *, causal, mask_padded):
    return _value_and_grads(_pair_reference, q, k, v, valid, sel, kept, ct_l, ct_s, causal=causal,
                            mask_padded=mask_padded)


def _case(seed, n, h, hk, lens, n_sel, causal, dtype, nan_padding=False):
    rng = np.random.default_rng(seed)
    valid_np = _valid(n, lens)
    sel, kept, _ = _random_selection(rng, valid_np, hk, n_sel, causal=causal)
    q, k, v = _qkv(rng, len(lens), n, h, hk, 16, dtype)
    cts = [jnp.asarray(rng.standard_normal(q.shape).astype(np.float32)) for _ in range(2)]
    return valid_np, (q, k, v, jnp.asarray(valid_np), jnp.asarray(sel), jnp.asarray(kept), *cts)


CASES = [
    # (N, H, Hk, lens, n_sel, causal, mask_padded, dtype)
    (1, 8, 2, [1], 4, True, False, jnp.float32),
    (5, 8, 8, [5, 2], 4, True, False, jnp.float32),  # G = 1, Nc = 0
    (16, 4, 2, [16, 9], 4, False, False, jnp.float32),
    (17, 8, 1, [17, 1], 4, True, False, jnp.float32),  # G = 8
    (50, 8, 2, [50, 37, 1], 4, True, False, jnp.float32),
    (50, 8, 2, [50, 37, 1], 4, False, False, jnp.float32),
    (50, 8, 2, [50, 37, 1], 4, True, False, jnp.bfloat16),
    (70, 8, 2, [70, 40], 8, True, False, jnp.float32),  # n > visible blocks
    (130, 8, 4, [130, 71], 4, False, True, jnp.float32),  # G = 2, masked padded block keys
    (130, 8, 2, [130, 64, 0], 4, True, False, jnp.float32),  # an all-padding row
    (130, 8, 2, [130, 64], 4, False, False, jnp.bfloat16),
]


@pytest.mark.parametrize("n,h,hk,lens,n_sel,causal,mask_padded,dtype", CASES)
def test_fused_matches_references(n, h, hk, lens, n_sel, causal, mask_padded, dtype):
    valid_np, args = _case(n + h + hk + len(lens), n, h, hk, lens, n_sel, causal, dtype)
    got = _kernel(*args, causal=causal, mask_padded=mask_padded)
    want = _reference(*args, causal=causal, mask_padded=mask_padded)
    tol = 2e-5 if dtype == jnp.float32 else 3e-2
    for name, a, r in zip(("o_ltis", "o_stis", "dq", "dk", "dv"), got, want):
        assert a.dtype == dtype, name
        _close(a, r, tol, name)
    for name, o in zip(("o_ltis", "o_stis", "dq"), got[:3]):
        assert (np.asarray(o.astype(jnp.float32))[~valid_np] == 0).all(), f"{name} at padded queries must be 0"


@pytest.mark.parametrize("causal", [True, False])
def test_compare_path_without_bitmask(monkeypatch, causal):
    """Longer sequences (ceil(N / b) > 32 blocks) test kept blocks by comparison instead of a bitmask: forced
    here at N = 70 by lowering the bitmask width, the results must stay those of the references."""
    assert fused_gpu._uses_bitmask(512, 16) and not fused_gpu._uses_bitmask(513, 16)
    monkeypatch.setattr(fused_gpu, "MAX_BITMASK_BLOCKS", 3)
    assert not fused_gpu._uses_bitmask(70, 16)
    jax.clear_caches()
    try:
        valid_np, args = _case(21, 70, 8, 2, [70, 33], 4, causal, jnp.float32)
        got = _kernel(*args, causal=causal, mask_padded=False)
        want = _reference(*args, causal=causal, mask_padded=False)
        for name, a, r in zip(("o_ltis", "o_stis", "dq", "dk", "dv"), got, want):
            _close(a, r, 2e-5, name)
    finally:
        jax.clear_caches()


@pytest.mark.parametrize("causal,mask_padded", [(True, False), (False, True), (False, False)])
def test_padding_skip_with_holes_and_trailing_padding(causal, mask_padded):
    """Validity with holes inside the sequence and padding after its last valid position (the extent the
    kernel skips past), padded q/k/v zero as the model makes them: equal to the references. Row 1 has its
    only valid positions in the first key tile, row 2 none at all."""
    rng = np.random.default_rng(5)
    n, h, hk = 70, 8, 2
    valid_np = rng.random((3, n)) < 0.7
    valid_np[0, 60:] = False
    valid_np[1, 20:] = False
    valid_np[2, :] = False
    sel, kept, _ = _random_selection(rng, valid_np, hk, 4, causal=causal)
    q, k, v = (jnp.where(jnp.asarray(valid_np)[:, :, None, None], x, 0).astype(x.dtype)
               for x in _qkv(rng, 3, n, h, hk, 16, jnp.float32))
    cts = [jnp.asarray(rng.standard_normal(q.shape).astype(np.float32)) for _ in range(2)]
    args = (q, k, v, jnp.asarray(valid_np), jnp.asarray(sel), jnp.asarray(kept), *cts)
    got = _kernel(*args, causal=causal, mask_padded=mask_padded)
    want = _reference(*args, causal=causal, mask_padded=mask_padded)
    for name, a, r in zip(("o_ltis", "o_stis", "dq", "dk", "dv"), got, want):
        _close(a, r, 2e-5, name)


@pytest.mark.parametrize("causal,mask_padded", [(True, False), (False, True)])
def test_nan_at_padding_does_not_leak(causal, mask_padded):
    """NaN in q, k, v at padded positions changes nothing: causal, and bidirectional with padded block keys
    masked (without that option the reference itself reads padded keys of kept blocks)."""
    valid_np, args = _case(3, 50, 8, 2, [50, 37, 1], 4, causal, jnp.float32)
    q, k, v = args[:3]
    pad = jnp.asarray(~valid_np)[:, :, None, None]
    nan_args = tuple(jnp.where(pad, jnp.nan, x) for x in (q, k, v)) + args[3:]
    got = _kernel(*nan_args, causal=causal, mask_padded=mask_padded)
    want = _reference(*args, causal=causal, mask_padded=mask_padded)
    for name, a, r in zip(("o_ltis", "o_stis", "dq", "dk", "dv"), got, want):
        if name in ("dk", "dv"):  # gradients w.r.t. padded keys are not defined by the reference: compare valid
            a, r = a[jnp.asarray(valid_np)], r[jnp.asarray(valid_np)]
        _close(a, r, 2e-5, name)


def test_backward_is_deterministic():
    _, args = _case(9, 130, 8, 2, [130, 99], 4, True, jnp.bfloat16)
    first = _kernel(*args, causal=True, mask_padded=False)
    second = _kernel(*[jnp.array(x, copy=True) for x in args], causal=True, mask_padded=False)
    for a, b in zip(first, second):
        assert np.array_equal(np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32)))


def test_argument_checks():
    q = jnp.zeros((1, 20, 8, 16))
    kv = jnp.zeros((1, 20, 3, 16))
    sel = jnp.zeros((1, 20, 2, 4), jnp.int32)
    with pytest.raises(ValueError, match="not a multiple"):
        fused_gpu.fused_attention_gpu(q, kv, kv, jnp.ones((1, 20), bool), jnp.zeros((1, 20, 3, 4), jnp.int32),
                                      jnp.zeros((1, 20, 3, 4), bool), interpret=True)
    kv = jnp.zeros((1, 20, 2, 16))
    with pytest.raises(ValueError, match="mismatch"):
        fused_gpu.fused_attention_gpu(q, kv, kv, jnp.ones((1, 20), bool), sel, sel[..., :2].astype(bool),
                                      interpret=True)
    with pytest.raises(ValueError, match="CUDA grid"):
        big = jax.ShapeDtypeStruct((70000, 4, 8, 16), jnp.bfloat16)
        big_kv = jax.ShapeDtypeStruct((70000, 4, 2, 16), jnp.bfloat16)
        big_sel = jax.ShapeDtypeStruct((70000, 4, 2, 4), jnp.int32)
        jax.eval_shape(lambda a, b, c, s_: fused_gpu.fused_attention_gpu(
            a, b, c, jnp.ones((70000, 4), bool), s_, s_ >= 0), big, big_kv, big_kv, big_sel)
    with pytest.raises(ValueError, match="do not match"):
        fused_gpu.fused_attention_gpu(q, kv[:, :10], kv[:, :10], jnp.ones((1, 20), bool), sel, sel.astype(bool),
                                      interpret=True)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
def test_cuda_export_lowering(dtype, causal):
    """Forward and gradient lower to Triton custom calls for platform 'cuda' on a CPU jaxlib."""
    bsz, n, h, hk, d, n_sel = 2, 200, 8, 2, 16, 4
    sds = jax.ShapeDtypeStruct
    disabled = [jax.export.DisabledSafetyCheck.custom_call(gpu_common.TRITON_CUSTOM_CALL_TARGET)]
    args = (sds((bsz, n, h, d), dtype), sds((bsz, n, hk, d), dtype), sds((bsz, n, hk, d), dtype),
            sds((bsz, n), jnp.bool_), sds((bsz, n, hk, n_sel), jnp.int32), sds((bsz, n, hk, n_sel), jnp.bool_))

    def fwd(q, k, v, valid, sel, kept):
        return fused_gpu.fused_attention_gpu(q, k, v, valid, sel, kept, causal=causal)

    def grad(q, k, v, valid, sel, kept):
        def loss(*a):
            o_l, o_s = fwd(*a, valid, sel, kept)
            return jnp.sum(o_l.astype(jnp.float32)) + jnp.sum(o_s.astype(jnp.float32) ** 2)
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    for fn, n_calls in ((fwd, 1), (grad, 3)):
        exported = jax.export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=disabled)(*args)
        assert exported.mlir_module().count(gpu_common.TRITON_CUSTOM_CALL_TARGET) == n_calls, fn.__name__
