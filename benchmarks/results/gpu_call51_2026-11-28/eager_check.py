"""Eager (un-jitted) calls of blossom_attention on the GPU run as one compiled program and agree with the jitted
path; gradients under the caller's jit unchanged."""
import time
import jax, jax.numpy as jnp, numpy as np
from blossom_jax import AttentionConfig, ModelConfig, blossom_attention
from blossom_jax.models import SequentialRecommender
import sys; sys.path.insert(0, "tests")
from conftest import random_attention_inputs

cfg = AttentionConfig()
for n, dtype in ((300, jnp.bfloat16), (1500, jnp.bfloat16), (300, jnp.float32)):
    q, k, v, g, p, valid = random_attention_inputs(cfg, 2, n, seed=n, dtype=dtype)
    for impl in ("pallas", "xla"):
        t = time.perf_counter(); out = jax.block_until_ready(blossom_attention(q, k, v, g, p, valid=valid, config=cfg, impl=impl)); first = time.perf_counter() - t
        t = time.perf_counter(); out2 = jax.block_until_ready(blossom_attention(q, k, v, g, p, valid=valid, config=cfg, impl=impl)); second = time.perf_counter() - t
        jitted = jax.jit(lambda *a: blossom_attention(*a[:5], valid=a[5], config=cfg, impl=impl))(q, k, v, g, p, valid)
        ref = jax.jit(lambda *a: blossom_attention(*a[:5], valid=a[5], config=cfg, impl="xla"))(q, k, v, g, p, valid)
        err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32))))
        same = bool(jnp.array_equal(out, jitted))
        print(f"N={n} {jnp.dtype(dtype).name} {impl}: eager first {first:.2f}s second {second*1e3:.2f}ms, eager==jit {same}, max|eager-xla| {err:.2e}", flush=True)
        assert same and np.isfinite(err) and err < (5e-2 if dtype == jnp.bfloat16 else 1e-4)
    def loss(impl):
        return lambda q, k, v, g: jnp.sum(blossom_attention(q, k, v, g, p, valid=valid, config=cfg, impl=impl).astype(jnp.float32) ** 2)
    gp = jax.jit(jax.grad(loss("pallas"), argnums=(0, 1, 2, 3)))(q, k, v, g)
    gx = jax.jit(jax.grad(loss("xla"), argnums=(0, 1, 2, 3)))(q, k, v, g)
    rel = max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))) / (float(jnp.max(jnp.abs(b.astype(jnp.float32)))) + 1e-6)) for a, b in zip(gp, gx))
    print(f"N={n} grads pallas vs xla (jit): max rel {rel:.2e}", flush=True)
    assert rel < 5e-2

config = ModelConfig(num_items=500, max_len=300, attention_impl="pallas", compute_dtype="bfloat16")
model = SequentialRecommender(config)
seq = jnp.asarray(np.random.default_rng(0).integers(1, 501, size=(4, 300)), jnp.int32)
lengths = jnp.asarray([300, 1, 120, 299], jnp.int32)
variables = jax.jit(model.init)(jax.random.key(0), seq, lengths)
t = time.perf_counter(); hidden = jax.block_until_ready(model.apply(variables, seq, lengths, method="encode")); first = time.perf_counter() - t
want = jax.jit(lambda v, s, l: model.apply(v, s, l, method="encode"))(variables, seq, lengths)
print(f"model encode eager (pallas) first {first:.2f}s, max|eager-jit| {float(jnp.max(jnp.abs(hidden.astype(jnp.float32) - want.astype(jnp.float32)))):.2e}")
print("EAGER CHECK OK")
