"""Gated (LTIS + STIS + gate mix) Pallas GPU kernels (pallas_kernels/gated_gpu.py) in interpret mode on CPU.

The kernels must equal ``gated_attention_reference`` (the gate mix of the pure-jnp LTIS and STIS references)
in the output and in the gradients w.r.t. q, k, v and the gates for a random cotangent: float32 and bfloat16,
N in {1, 5, 17, 50, 130, 300} (N < 16, N not a multiple of 16, multiple query tiles and key blocks), GQA
G in {1, 2, 4, 8}, right padding with one-item and all-padding rows, n larger than the number of visible
blocks, NaN at padded positions, padded outputs poisoned before the call. Plus bitwise determinism of the
backward, the CUDA lowering through ``jax.export`` and the argument checks.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import gated_gpu, gpu_common, ltis_gpu
from test_pallas_ltis_gpu import _close, _launch_params, _qkv, _random_selection, _valid


def _value_and_grads(fn, q, k, v, gates, valid, sel, kept, ct, **kw):
    out, vjp = jax.vjp(lambda a, b, c, g: fn(a, b, c, g, valid, sel, kept, **kw), q, k, v, gates)
    return (out, *vjp(ct.astype(out.dtype)))


@functools.partial(jax.jit, static_argnames=("mask_padded",))
def _kernel(q, k, v, gates, valid, sel, kept, ct, *, mask_padded):
    fn = functools.partial(gated_gpu.gated_attention_gpu, interpret=True)
    return _value_and_grads(fn, q, k, v, gates, valid, sel, kept, ct, mask_padded_block_keys=mask_padded)


@functools.partial(jax.jit, static_argnames=("mask_padded",))
def _reference(q, k, v, gates, valid, sel, kept, ct, *, mask_padded):
    return _value_and_grads(gated_gpu.gated_attention_reference, q, k, v, gates, valid, sel, kept, ct,
                            mask_padded_block_keys=mask_padded)


def _case(seed, n, h, hk, lens, n_sel, dtype):
    rng = np.random.default_rng(seed)
    valid_np = _valid(n, lens)
    sel, kept, _ = _random_selection(rng, valid_np, hk, n_sel, causal=True)
    q, k, v = _qkv(rng, len(lens), n, h, hk, 16, dtype)
    gates = jnp.asarray(rng.uniform(0.0, 1.0, (len(lens), n, h, 2)).astype(np.float32), dtype)
    ct = jnp.asarray(rng.standard_normal(q.shape).astype(np.float32))
    return valid_np, (q, k, v, gates, jnp.asarray(valid_np), jnp.asarray(sel), jnp.asarray(kept), ct)


CASES = [
    # (N, H, Hk, lens, n_sel, mask_padded, dtype)
    (1, 8, 2, [1], 4, False, jnp.float32),
    (5, 8, 8, [5, 2], 4, False, jnp.float32),  # G = 1, Nc = 0
    (17, 8, 1, [17, 1], 4, False, jnp.float32),  # G = 8
    (50, 8, 2, [50, 37, 1], 4, False, jnp.float32),
    (50, 8, 2, [50, 37, 1], 4, False, jnp.bfloat16),
    (70, 8, 2, [70, 40], 8, False, jnp.float32),  # n > visible blocks
    (130, 8, 4, [130, 71], 4, True, jnp.float32),  # G = 2, masked padded block keys
    (130, 8, 2, [130, 64, 0], 4, False, jnp.float32),  # an all-padding row
    (300, 8, 2, [300, 157], 4, False, jnp.bfloat16),  # powers of two up to 256
]


@pytest.mark.parametrize("n,h,hk,lens,n_sel,mask_padded,dtype", CASES)
def test_gated_matches_reference(n, h, hk, lens, n_sel, mask_padded, dtype):
    valid_np, args = _case(n + h + hk + len(lens), n, h, hk, lens, n_sel, dtype)
    got = _kernel(*args, mask_padded=mask_padded)
    want = _reference(*args, mask_padded=mask_padded)
    tol = 2e-5 if dtype == jnp.float32 else 3e-2
    for name, a, r in zip(("out", "dq", "dk", "dv", "dgates"), got, want):
        assert a.dtype == dtype, name
        _close(a, r, tol, name)
    for name, x in zip(("out", "dq", "dgates"), (got[0], got[1], got[4])):
        assert (np.asarray(x.astype(jnp.float32))[~valid_np] == 0).all(), f"{name} at padded queries must be 0"


@pytest.mark.parametrize("constant", ["KV_HEAD_MAJOR", "DKV_BLOCKS_OUTER"])
def test_layouts_and_launch_orders_give_identical_results(monkeypatch, constant):
    """Head-major K / V (``ltis_gpu.KV_HEAD_MAJOR``) and the model's layout differ only in addresses, the two dK/dV
    launch orders (``ltis_gpu.DKV_BLOCKS_OUTER``) only in when each program runs: outputs and all gradients bitwise
    equal."""
    _, args = _case(3, 130, 8, 2, [130, 64, 0], 4, jnp.float32)
    fn = functools.partial(gated_gpu.gated_attention_gpu, interpret=True)
    results = []
    for value in (1, 0):
        monkeypatch.setattr(ltis_gpu, constant, value)  # read at trace time: a fresh jit per value
        results.append(jax.jit(functools.partial(_value_and_grads, fn))(*args))
    for name, a, b in zip(("out", "dq", "dk", "dv", "dgates"), *results):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)


def test_every_output_element_is_written():
    """Outputs are fresh buffers; poisoning the (donated) inputs' memory is not possible through jax, so the
    check is that no NaN appears anywhere and padded rows are exactly 0, with NaN in every padded input."""
    valid_np, args = _case(4, 50, 8, 2, [50, 37, 1], 4, jnp.float32)
    q, k, v, gates = args[:4]
    pad = jnp.asarray(~valid_np)[:, :, None, None]
    nan_args = tuple(jnp.where(pad, jnp.nan, x) for x in (q, k, v, gates)) + args[4:]
    got = _kernel(*nan_args, mask_padded=False)
    want = _reference(*args, mask_padded=False)
    for name, a, r in zip(("out", "dq", "dk", "dv", "dgates"), got, want):
        if name in ("dk", "dv"):  # gradients w.r.t. padded keys are not defined by the reference: compare valid
            a, r = a[jnp.asarray(valid_np)], r[jnp.asarray(valid_np)]
        _close(a, r, 2e-5, name)


def test_matches_separate_kernels():
    """The merged kernels equal the two-kernel path (ltis_gpu + stis_gpu + the gate mix in XLA)."""
    from pallas_kernels import ltis_gpu, stis_gpu

    def separate(q, k, v, gates, valid, sel, kept):
        o_l = ltis_gpu.ltis_attention_gpu(q, k, v, valid, sel, kept, causal=True, interpret=True)
        o_s = stis_gpu.stis_attention_gpu(q, k, v, valid, causal=True, interpret=True)
        out = gates[..., 0:1] * o_l + gates[..., 1:2] * o_s
        return jnp.where(valid[:, :, None, None], out, 0.0)

    valid_np, args = _case(11, 70, 8, 2, [70, 33], 4, jnp.float32)
    got = _kernel(*args, mask_padded=False)
    want = jax.jit(lambda *a: _value_and_grads(separate, *a))(*args)
    for name, a, r in zip(("out", "dq", "dk", "dv", "dgates"), got, want):
        _close(a, r, 2e-5, name)


def test_backward_is_deterministic():
    _, args = _case(9, 130, 8, 2, [130, 99], 4, jnp.bfloat16)
    first = _kernel(*args, mask_padded=False)
    second = _kernel(*[jnp.array(x, copy=True) for x in args], mask_padded=False)
    for a, b in zip(first, second):
        assert np.array_equal(np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32)))


def test_supports_and_argument_checks():
    assert gated_gpu.supports(causal=True, num_heads=8, num_kv_heads=2)
    assert not gated_gpu.supports(causal=False, num_heads=8, num_kv_heads=2)
    assert not gated_gpu.supports(causal=True, num_heads=6, num_kv_heads=2)  # G = 3
    q = jnp.zeros((1, 20, 8, 16))
    kv = jnp.zeros((1, 20, 2, 16))
    sel = jnp.zeros((1, 20, 2, 4), jnp.int32)
    valid = jnp.ones((1, 20), bool)
    with pytest.raises(ValueError, match="gates must be"):
        gated_gpu.gated_attention_gpu(q, kv, kv, jnp.zeros((1, 20, 8)), valid, sel, sel >= 0, interpret=True)
    with pytest.raises(ValueError, match="power-of-two GQA group"):
        gated_gpu.gated_attention_gpu(jnp.zeros((1, 20, 6, 16)), kv, kv, jnp.zeros((1, 20, 6, 2)), valid, sel,
                                      sel >= 0, interpret=True)
    with pytest.raises(ValueError, match="block_size"):
        gated_gpu.gated_attention_gpu(q, kv, kv, jnp.zeros((1, 20, 8, 2)), valid, sel, sel >= 0, block_size=24,
                                      interpret=True)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_cuda_export_lowering(dtype):
    """Forward and gradient lower to Triton custom calls for platform 'cuda' on a CPU jaxlib: one kernel
    forward, two backward (dQ; dK/dV)."""
    bsz, n, h, hk, d, n_sel = 2, 1024, 8, 2, 16, 4
    sds = jax.ShapeDtypeStruct
    disabled = [jax.export.DisabledSafetyCheck.custom_call(gpu_common.TRITON_CUSTOM_CALL_TARGET)]
    args = (sds((bsz, n, h, d), dtype), sds((bsz, n, hk, d), dtype), sds((bsz, n, hk, d), dtype),
            sds((bsz, n, h, 2), dtype), sds((bsz, n), jnp.bool_), sds((bsz, n, hk, n_sel), jnp.int32),
            sds((bsz, n, hk, n_sel), jnp.bool_))

    def fwd(q, k, v, gates, valid, sel, kept):
        return gated_gpu.gated_attention_gpu(q, k, v, gates, valid, sel, kept)

    def grad(q, k, v, gates, valid, sel, kept):
        def loss(*a):
            return jnp.sum(fwd(*a, valid, sel, kept).astype(jnp.float32) ** 2)
        return jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, gates)

    for fn, n_calls in ((fwd, 1), (grad, 3)):
        exported = jax.export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=disabled)(*args)
        assert exported.mlir_module().count(gpu_common.TRITON_CUSTOM_CALL_TARGET) == n_calls, fn.__name__
    # (num_stages, num_warps) of each kernel: the module constants reach the custom calls
    assert _launch_params(exported.mlir_module()) == {
        "gated_attention_fwd": (gpu_common.NUM_STAGES, gated_gpu.FWD_NUM_WARPS),
        "gated_attention_dq": (gpu_common.NUM_STAGES, gated_gpu.DQ_NUM_WARPS),
        "gated_attention_dkv": (gated_gpu.DKV_NUM_STAGES, gated_gpu.DKV_NUM_WARPS)}
