"""STIS Pallas GPU kernels (pallas_kernels/stis_gpu.py), run with the Pallas interpreter on CPU.

Every case compares the kernel, the offset-shift jnp reference (pallas_kernels/stis_reference.py) and a
brute-force dense-mask oracle written here from the SPEC section 4 rules, for the outputs and for the
gradients w.r.t. q, k and v under a random cotangent. Inputs (and the cotangent) are NaN at padded
positions; outputs and gradients must be finite everywhere, exactly 0 at padded queries (outputs, dq)
and padded keys (dk, dv). The Pallas interpreter fills output buffers with NaN before the kernels run,
so "finite everywhere" also proves that every output element is written (the GPU leaves them
uninitialised).

The interpreter is slow to compile, so each case is one jit of kernel + reference + oracle (forward
and VJP together), and the case list is chosen to cover N in
{1, 5, 16, 17, 50, 130}, G in {1, 2, 3 (one head per program fallback), 4, 8}, causal /
bidirectional, sink on / off (incl. the sink's cross-tile gradient reduction), windows 2/4/8, float32
and bfloat16, several query tiles, offset loops and fully unrolled offsets, a non-power-of-two head
dim, within about a minute of CPU time. On a machine whose default backend is a GPU every case also
runs the compiled Triton kernels (interpret=False); on CPU those are skipped.
"""
from __future__ import annotations

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import stis_gpu
from pallas_kernels.stis_gpu import stis_attention_gpu, stis_offsets
from pallas_kernels.stis_reference import stis_attention_reference, stis_reference_offsets


@pytest.fixture(scope="module", autouse=True)
def _fast_cpu_compiles():
    # The interpreted kernels are large HLO programs; XLA's optimisations only cost compile time here.
    try:
        old = jax.config.read("jax_disable_most_optimizations")
    except (AttributeError, KeyError):  # flag gone in some jax version: just compile normally
        yield
        return
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", old)


# --------------------------------------------------------------------------------------------------
# Brute-force oracle straight from SPEC section 4.

def dense_mask(valid: np.ndarray, causal: bool, window: int, sink: bool) -> np.ndarray:
    """[B, N, N] bool: query i may attend key j."""
    n = valid.shape[1]
    i = np.arange(n)[:, None]
    j = np.arange(n)[None, :]
    r = i - j
    pow2 = (r > 0) & ((r & (r - 1)) == 0)
    is_sink = (j == n - 1) if sink else np.zeros((1, n), bool)
    if causal:
        allowed = (r >= 0) & ((r < window) | pow2 | is_sink)
    else:
        allowed = (np.abs(r) < window) | pow2 | is_sink
    return allowed[None] & valid[:, :, None] & valid[:, None, :]


def dense_oracle(q, k, v, valid, mask):
    b, n, h, d = q.shape
    g = h // k.shape[2]
    vm = valid[:, :, None, None]
    qf = jnp.where(vm, q.astype(jnp.float32), 0.0)
    kf = jnp.repeat(jnp.where(vm, k.astype(jnp.float32), 0.0), g, axis=2)  # head g -> kv head g // G
    vf = jnp.repeat(jnp.where(vm, v.astype(jnp.float32), 0.0), g, axis=2)
    hi = jax.lax.Precision.HIGHEST
    s = jnp.einsum("bihd,bjhd->bhij", qf, kf, precision=hi) / math.sqrt(d)
    m = jnp.asarray(mask)[:, None]
    s = jnp.where(m, s, -jnp.inf)
    mx = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
    mx = jnp.where(jnp.isfinite(mx), mx, 0.0)
    p = jnp.where(m, jnp.exp(s - mx), 0.0)
    l = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(l > 0, l, 1.0)
    o = jnp.einsum("bhij,bjhd->bihd", p, vf, precision=hi)
    return jnp.where(vm, o, 0.0).astype(q.dtype)


# --------------------------------------------------------------------------------------------------
# Inputs: right padding, one row with a single valid item, NaN at every padded position.

def make_inputs(b, n, h, hk, d, dtype, seed=0):
    rng = np.random.default_rng(seed)
    lens = np.array([n, 1, max(1, (3 * n) // 5), max(1, n - 1)])[:b]
    valid = np.arange(n)[None, :] < lens[:, None]
    vm = valid[:, :, None, None]

    def rnd(*shape):
        x = rng.standard_normal(shape).astype(np.float32)
        return jnp.asarray(np.where(vm, x, np.nan), dtype)

    return rnd(b, n, h, d), rnd(b, n, hk, d), rnd(b, n, hk, d), jnp.asarray(valid), rnd(b, n, h, d)


@functools.partial(jax.jit, static_argnames=("causal", "window", "sink", "block_q", "block_k",
                                             "unroll", "interpret"))
def _all_three(q, k, v, valid, ct, mask, *, causal, window, sink, block_q, block_k, unroll,
               interpret):
    def fwd_vjp(f):
        o, pull = jax.vjp(f, q, k, v)
        return o, pull(ct)

    kern = fwd_vjp(lambda q, k, v: stis_attention_gpu(
        q, k, v, valid, causal=causal, window=window, sink=sink, block_q=block_q, block_k=block_k,
        unroll=unroll, interpret=interpret))
    ref = fwd_vjp(lambda q, k, v: stis_attention_reference(
        q, k, v, valid, causal=causal, window=window, sink=sink))
    orc = fwd_vjp(lambda q, k, v: dense_oracle(q, k, v, valid, mask))
    return kern, ref, orc


def _check_close(name, got, want, atol, rtol):
    got = np.asarray(jnp.asarray(got, jnp.float32))
    want = np.asarray(jnp.asarray(want, jnp.float32))
    np.testing.assert_allclose(got, want, atol=atol, rtol=rtol, err_msg=name)


F32, BF16 = jnp.float32, jnp.bfloat16
# (B, N, H, Hk, d, causal, sink, window, dtype, block_q, block_k, unroll)
CASES = [
    pytest.param(2, 1, 2, 2, 16, True, True, 8, F32, None, None, False, id="n1-g1-causal"),
    pytest.param(3, 5, 4, 2, 12, False, True, 2, F32, None, None, False,
                 id="n5-g2-d12-bidir-sink-w2"),
    pytest.param(3, 16, 8, 2, 16, False, False, 8, F32, None, None, False, id="n16-g4-bidir-nosink"),
    pytest.param(3, 17, 8, 1, 16, False, True, 8, F32, None, None, False, id="n17-g8-bidir-sink"),
    pytest.param(4, 17, 4, 2, 16, True, True, 8, F32, 16, None, True,
                 id="n17-g2-causal-2tiles-unrolled"),
    pytest.param(3, 50, 6, 2, 16, False, True, 4, F32, 16, 32, False,
                 id="n50-g3-fallback-bidir-sink-w4-4tiles"),
    pytest.param(3, 130, 8, 2, 16, False, True, 8, F32, None, 32, False,
                 id="n130-g4-bidir-sink-3tiles"),
    pytest.param(3, 130, 2, 2, 16, True, True, 8, F32, 32, 64, False, id="n130-g1-causal-5tiles"),
    pytest.param(3, 130, 8, 2, 16, False, True, 8, F32, 32, 16, True,
                 id="n130-g4-bidir-sink-unrolled"),
    pytest.param(3, 50, 8, 2, 16, False, True, 8, BF16, None, None, False,
                 id="bf16-n50-g4-bidir-sink"),
    pytest.param(3, 130, 8, 2, 16, True, True, 8, BF16, None, None, False, id="bf16-n130-g4-causal"),
]


ON_GPU = jax.default_backend() == "gpu"


@pytest.mark.parametrize("backend", ["interpret", "triton"])
@pytest.mark.parametrize("b,n,h,hk,d,causal,sink,window,dtype,block_q,block_k,unroll", CASES)
def test_kernel_vs_reference_vs_oracle(b, n, h, hk, d, causal, sink, window, dtype, block_q, block_k,
                                       unroll, backend):
    if backend == "triton" and not ON_GPU:
        pytest.skip("compiled Triton kernels need a GPU (the interpret variant covers the same code)")
    q, k, v, valid, ct = make_inputs(b, n, h, hk, d, dtype, seed=n * 31 + h)
    mask = dense_mask(np.asarray(valid), causal, window, sink)
    kern, ref, orc = _all_three(q, k, v, valid, ct, mask, causal=causal, window=window, sink=sink,
                                block_q=block_q, block_k=block_k, unroll=unroll,
                                interpret=backend == "interpret")
    names = ("o", "dq", "dk", "dv")
    kern = (kern[0], *kern[1])
    ref = (ref[0], *ref[1])
    orc = (orc[0], *orc[1])

    vq = np.asarray(valid)[:, :, None, None]
    for name, x in zip(names, kern):
        assert x.dtype == dtype, name
        x = np.asarray(jnp.asarray(x, jnp.float32))
        assert np.isfinite(x).all(), f"non-finite {name}"
        # Padded queries (o, dq) and padded keys (dk, dv) are exactly zero.
        assert (np.broadcast_to(vq, x.shape) | (x == 0)).all(), f"{name} not 0 at padding"
    for name, x in zip(names, ref):
        assert np.isfinite(np.asarray(jnp.asarray(x, jnp.float32))).all(), f"reference non-finite {name}"

    if dtype == F32:
        atol, rtol = 1e-5, 1e-5
    else:
        # bf16 storage of o/dq/dk/dv and of the saved o (delta); all accumulation is f32.
        atol, rtol = 4e-2, 4e-2
    for name, a, r, o in zip(names, kern, ref, orc):
        _check_close(f"kernel vs oracle: {name}", a, o, atol, rtol)
        _check_close(f"kernel vs reference: {name}", a, r, atol, rtol)
        _check_close(f"reference vs oracle: {name}", r, o, atol, rtol)


@pytest.mark.parametrize("causal,h,hk", [(False, 8, 2), (True, 6, 2)], ids=["bidir-sink-g4", "causal-g3"])
def test_kv_layouts_give_identical_results(monkeypatch, causal, h, hk):
    """Head-major K / V (``KV_HEAD_MAJOR``) and the model's layout differ only in addresses: outputs and gradients
    bitwise equal, with the bidirectional sink's partial gradients and with a non-power-of-two group (one query
    head per program, dk / dv summed over the group afterwards)."""
    q, k, v, valid, ct = make_inputs(2, 50, h, hk, 16, F32, seed=3)
    results = []
    for head_major in (True, False):
        monkeypatch.setattr(stis_gpu, "KV_HEAD_MAJOR", head_major)  # read at call time

        def fwd_vjp(q, k, v):
            o, pull = jax.vjp(lambda q_, k_, v_: stis_attention_gpu(q_, k_, v_, valid, causal=causal, window=4,
                                                                     sink=True, interpret=True), q, k, v)
            return (o, *pull(ct))
        results.append(jax.jit(fwd_vjp)(q, k, v))
    for name, a, b in zip(("o", "dq", "dk", "dv"), *results):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)


# --------------------------------------------------------------------------------------------------
# Cheap structural checks.

@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [1, 3, 8])
def test_offsets_match_mask_rules(causal, window):
    for n in (1, 2, 5, 8, 9, 16, 17, 50, 130, 1000):
        valid = np.ones((1, n), bool)
        m = dense_mask(valid, causal, window, sink=False)[0]
        want = {i - j for i in range(n) for j in range(n) if m[i, j]}
        got = stis_offsets(n, window, causal)
        assert len(got) == len(set(got))
        assert set(got) == want, (n, window, causal)
        assert set(stis_reference_offsets(n, window, causal)) == want
    # The sink adds key N-1 only where it is not already in the window (bidirectional only).
    n = 40
    m_sink = dense_mask(np.ones((1, n), bool), False, window, sink=True)[0]
    m_plain = dense_mask(np.ones((1, n), bool), False, window, sink=False)[0]
    extra = m_sink & ~m_plain
    assert (np.nonzero(extra)[1] == n - 1).all()
    assert set(np.nonzero(extra)[0]) == {i for i in range(n) if n - 1 - i >= window}
    assert (dense_mask(np.ones((1, n), bool), True, window, True) ==
            dense_mask(np.ones((1, n), bool), True, window, False)).all()


def test_bad_arguments():
    q = jnp.zeros((1, 4, 4, 16))
    k = jnp.zeros((1, 4, 2, 16))
    valid = jnp.ones((1, 4), bool)
    with pytest.raises(ValueError):
        stis_attention_gpu(q, k, k, valid, window=0, interpret=True)
    with pytest.raises(ValueError):
        stis_attention_gpu(q, jnp.zeros((1, 4, 3, 16)), jnp.zeros((1, 4, 3, 16)), valid, interpret=True)
    with pytest.raises(ValueError):
        stis_attention_gpu(q, k, k, valid[:, :3], interpret=True)
    with pytest.raises(ValueError):
        stis_attention_gpu(q, k, k, valid, block_q=24, interpret=True)


# --------------------------------------------------------------------------------------------------
# Lowering for CUDA without a GPU.

# Custom-call targets of Pallas-Triton kernels: jaxlib <= 0.10.2 hands the Triton IR to XLA's Triton
# emitter ("__gpu$xla.gpu.triton"); newer jaxlibs compile it in the lowering ("triton_kernel_call_ffi",
# historically "triton_kernel_call").
_TRITON_TARGETS = ("__gpu$xla.gpu.triton", "triton_kernel_call_ffi", "triton_kernel_call")


@pytest.mark.parametrize("causal", [True, False])
def test_lowers_for_cuda(causal):
    """Exports forward and gradient for platform "cuda" on this CPU-only install.

    This runs the whole Pallas -> Triton-IR lowering of all three kernels (every primitive needs a
    Triton lowering rule, every in-kernel tensor a power-of-two shape, the compiler params must select
    the Triton backend rather than Mosaic GPU) and checks that the exported StableHLO holds exactly the
    expected Triton custom calls. It does not run Triton's own passes (layouts, PTX): those run when XLA
    compiles the module on a GPU.
    """
    from jax import export

    b, n, h, hk, d = 2, 130, 8, 2, 16
    sds = jax.ShapeDtypeStruct
    args = (sds((b, n, h, d), jnp.bfloat16), sds((b, n, hk, d), jnp.bfloat16),
            sds((b, n, hk, d), jnp.bfloat16), sds((b, n), jnp.bool_))

    def fwd(q, k, v, valid):
        return stis_attention_gpu(q, k, v, valid, causal=causal)

    def grad(q, k, v, valid):
        return jax.grad(lambda q, k, v: jnp.sum(fwd(q, k, v, valid).astype(jnp.float32)),
                        argnums=(0, 1, 2))(q, k, v)

    checks = [export.DisabledSafetyCheck.custom_call(t) for t in _TRITON_TARGETS]
    for fn, kernels in ((fwd, ["stis_fwd"]), (grad, ["stis_fwd", "stis_bwd_dq", "stis_bwd_dkv"])):
        try:
            exp = export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=checks)(*args)
        except RuntimeError as e:
            # jaxlib > 0.10.2 compiles the Triton IR to PTX inside the lowering, through a handler that only
            # the CUDA plugin registers: without it this check cannot run here (it does on a GPU machine).
            if "does not have a Triton compilation handler" in str(e):
                pytest.skip(f"CUDA lowering needs the jax CUDA plugin with this jaxlib: {e}")
            raise
        assert exp.platforms == ("cuda",)
        text = exp.mlir_module()
        targets = re.findall(r"stablehlo\.custom_call @([\w$.]+)\(", text)
        assert targets and set(targets) <= set(_TRITON_TARGETS), targets
        assert len(targets) == len(kernels), targets
        for kname in kernels:
            assert kname in text, kname
