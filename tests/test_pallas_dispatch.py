"""``impl="pallas"`` end to end (compression, selection kernel, LTIS and STIS kernels, gate) against the
dense-mask reference, for every backend's kernels run in the Pallas interpreter: outputs and gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blossom_jax import AttentionConfig, blossom_attention
from blossom_jax.ops import pallas as pallas_ops
from conftest import random_attention_inputs


def _interpret(backend):
    if backend == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        return pltpu.InterpretParams()
    return True


def _run(fn, inputs, cotangent):
    """fn's output and its gradients w.r.t. q, k, v and the gates, jitted (an op-by-op run of the same
    computation compiles each op on its own: 3-7x slower in the interpreter)."""
    def out_and_grads(inputs, cotangent):
        q, k, v, gates, params, valid = inputs

        def loss(q, k, v, gates):
            out = fn(q, k, v, gates, params, valid)
            return jnp.sum(out.astype(jnp.float32) * cotangent), out

        (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(q, k, v, gates)
        return out, grads

    return jax.jit(out_and_grads)(inputs, cotangent)


CASES = [
    # (causal, seq_len, num_heads, num_kv_heads, dtype, extra config)
    (True, 37, 8, 2, jnp.float32, {}),
    (False, 37, 8, 2, jnp.float32, {}),
    (True, 9, 4, 4, jnp.float32, {}),
    (True, 70, 8, 1, jnp.bfloat16, {}),
    (True, 40, 4, 2, jnp.float32, {"straight_through": True}),
    (False, 33, 4, 2, jnp.float32, {"mask_padded_block_keys": True}),
]


# "gpu" runs the fused dense-tile kernel (N <= FUSED_MAX_LEN); "gpu-split" the separate LTIS / STIS gather
# kernels that longer sequences use; "gpu-gated" the merged gather kernels of the longest causal sequences
# (forced here; bidirectional attention and straight-through fall back to the separate kernels).
def _gated_runs(case) -> bool:
    causal, extra = case[0], case[5]
    return causal and not extra.get("straight_through")


def _tpu_adds(case) -> bool:
    # The TPU kernels run ~20-25 s per case in the interpreter, and tests/test_pallas_tpu.py tests each of them
    # (float32 and bfloat16, causal and bidirectional, GQA groups 1-8, multi-tile). Here: the wiring on TPU, once
    # causal (bfloat16, a GQA group of 8) and once bidirectional (padded block keys masked).
    causal, dtype, extra = case[0], case[4], case[5]
    return (causal and dtype == jnp.bfloat16) or (not causal and extra.get("mask_padded_block_keys", False))


# The gated kernels only where they run: elsewhere "gpu-gated" would repeat "gpu-split".
BACKEND_CASES = [(backend, *case) for case in CASES for backend in ("gpu", "gpu-gated", "gpu-split", "tpu")
                 if (backend != "gpu-gated" or _gated_runs(case)) and (backend != "tpu" or _tpu_adds(case))]


@pytest.mark.slow
@pytest.mark.parametrize("backend,causal,seq_len,num_heads,num_kv_heads,dtype,extra", BACKEND_CASES)
def test_pallas_impl_matches_reference(backend, causal, seq_len, num_heads, num_kv_heads, dtype, extra,
                                       monkeypatch):
    config = AttentionConfig(num_heads=num_heads, num_kv_heads=num_kv_heads, causal=causal, **extra)
    if backend in ("gpu-gated", "gpu-split"):
        from pallas_kernels import fused_gpu, gated_gpu

        monkeypatch.setattr(fused_gpu, "FUSED_MAX_LEN", 0)
        monkeypatch.setattr(fused_gpu, "FUSED_MAX_LEN_BIDIRECTIONAL", 0)
        if backend == "gpu-gated":
            monkeypatch.setattr(gated_gpu, "MIN_LEN", 1)
        assert pallas_ops.uses_gated_kernels("gpu", seq_len, config) == (backend == "gpu-gated")
        backend = "gpu"
    inputs = random_attention_inputs(config, 2, seq_len, seed=seq_len + num_heads, dtype=dtype)
    cotangent = jnp.asarray(np.random.default_rng(1).normal(size=inputs[0].shape), jnp.float32)
    interpret = _interpret(backend)

    def pallas_fn(q, k, v, gates, params, valid):
        return pallas_ops.blossom_attention_pallas(q, k, v, gates, params, valid, config, backend=backend,
                                                   interpret=interpret)

    def reference_fn(q, k, v, gates, params, valid):
        return blossom_attention(q, k, v, gates, params, valid=valid, config=config, impl="reference")

    out, grads = _run(pallas_fn, inputs, cotangent)
    want_out, want_grads = _run(reference_fn, inputs, cotangent)
    tol = dict(atol=2e-5, rtol=2e-5) if dtype == jnp.float32 else dict(atol=4e-2, rtol=4e-2)
    assert out.dtype == dtype
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want_out, np.float32), **tol)
    assert np.all(np.asarray(out, np.float32)[~np.asarray(inputs[5])] == 0.0)
    for got, want in zip(grads, want_grads):
        assert np.all(np.isfinite(np.asarray(got, np.float32)))
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), **tol)


def test_pallas_on_cpu_is_a_clear_error():
    config = AttentionConfig()
    inputs = random_attention_inputs(config, 1, 20)
    if jax.default_backend() == "cpu":
        with pytest.raises(ValueError, match="not for backend 'cpu'"):
            blossom_attention(*inputs[:5], valid=inputs[5], config=config, impl="pallas")
        assert not pallas_ops.available("cpu")


def test_fused_kernel_policy(monkeypatch):
    from pallas_kernels import fused_gpu

    config = AttentionConfig()
    assert pallas_ops.uses_fused_kernel("gpu", fused_gpu.FUSED_MAX_LEN, config)
    assert not pallas_ops.uses_fused_kernel("gpu", fused_gpu.FUSED_MAX_LEN + 1, config)
    assert not pallas_ops.uses_fused_kernel("gpu", 50, AttentionConfig(straight_through=True))
    assert not pallas_ops.uses_fused_kernel("tpu", 50, config)
    bidirectional = AttentionConfig(causal=False)
    assert pallas_ops.uses_fused_kernel("gpu", fused_gpu.FUSED_MAX_LEN_BIDIRECTIONAL, bidirectional)
    assert not pallas_ops.uses_fused_kernel("gpu", fused_gpu.FUSED_MAX_LEN_BIDIRECTIONAL + 1, bidirectional)
    monkeypatch.setattr(fused_gpu, "FUSED_MAX_LEN", 0)
    monkeypatch.setattr(fused_gpu, "FUSED_MAX_LEN_BIDIRECTIONAL", 0)
    assert not pallas_ops.uses_fused_kernel("gpu", 1, config)
    assert not pallas_ops.uses_fused_kernel("gpu", 1, bidirectional)


def test_gated_kernel_policy(monkeypatch):
    from pallas_kernels import fused_gpu, gated_gpu

    config = AttentionConfig()
    longer = fused_gpu.FUSED_MAX_LEN + 1
    assert pallas_ops.uses_gated_kernels("gpu", gated_gpu.MIN_LEN, config)
    assert not pallas_ops.uses_gated_kernels("gpu", gated_gpu.MIN_LEN - 1, config)
    monkeypatch.setattr(gated_gpu, "MIN_LEN", 1)
    assert pallas_ops.uses_gated_kernels("gpu", longer, config)
    assert not pallas_ops.uses_gated_kernels("gpu", fused_gpu.FUSED_MAX_LEN, config)  # the fused kernel's
    assert not pallas_ops.uses_gated_kernels("gpu", longer, AttentionConfig(causal=False))
    assert not pallas_ops.uses_gated_kernels("gpu", longer, AttentionConfig(straight_through=True))
    assert not pallas_ops.uses_gated_kernels("gpu", longer, AttentionConfig(num_heads=6, num_kv_heads=2))
    assert not pallas_ops.uses_gated_kernels("tpu", longer, config)
    monkeypatch.setattr(gated_gpu, "MIN_LEN", longer + 1)
    assert not pallas_ops.uses_gated_kernels("gpu", longer, config)


def test_auto_policy():
    config = AttentionConfig()
    assert pallas_ops.auto_prefers_pallas("gpu", 4096, config)
    assert pallas_ops.auto_prefers_pallas("gpu", pallas_ops.GPU_AUTO_MIN_LEN, config)
    assert not pallas_ops.auto_prefers_pallas("tpu", 4096, config)
    from blossom_jax import resolve_impl

    if jax.default_backend() == "cpu":
        assert resolve_impl("auto", 4096, config) == "xla"


def test_float32_kernel_dot_precision_follows_jax_default():
    """float32 kernel dots are IEEE only when jax_default_matmul_precision asks for it ("highest", "float32"
    or the F32_F32_F32 algorithm). The selection scores are TF32x3 when compiled and IEEE under "highest" or in
    the interpreter."""
    from jax import lax

    from pallas_kernels import gpu_common

    assert gpu_common.selection_score_precision(False) == lax.DotAlgorithmPreset.TF32_TF32_F32_X3
    assert gpu_common.selection_score_precision(True) == lax.Precision.HIGHEST
    with jax.default_matmul_precision("highest"):
        assert gpu_common.selection_score_precision(False) == lax.Precision.HIGHEST

    assert not gpu_common.float32_products_exact()
    for setting in ("highest", "float32", "F32_F32_F32"):
        with jax.default_matmul_precision(setting):
            assert gpu_common.float32_products_exact(), setting
    for setting in ("tensorfloat32", "bfloat16", "default", "TF32_TF32_F32"):
        with jax.default_matmul_precision(setting):
            assert not gpu_common.float32_products_exact(), setting
