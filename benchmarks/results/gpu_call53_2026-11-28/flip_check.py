"""bf16 at N = 1500: pallas and xla each against the float32 reference on the same (bf16-rounded) inputs; where
they differ, is it where the selected blocks differ (a near-tie of the selection scores)?"""
import jax, jax.numpy as jnp, numpy as np
from blossom_jax import AttentionConfig, blossom_attention
import sys; sys.path.insert(0, "tests")
from conftest import random_attention_inputs

cfg = AttentionConfig()
for n in (1500, 1024, 4096):
    q, k, v, g, p, valid = random_attention_inputs(cfg, 2, n, seed=n, dtype=jnp.bfloat16)
    f32 = [x.astype(jnp.float32) for x in (q, k, v, g)]
    run = lambda impl, args: jax.jit(lambda *a: blossom_attention(*a[:5], valid=a[5], config=cfg, impl=impl))(*args)
    with jax.default_matmul_precision("highest"):
        ref = np.asarray(run("reference" if n <= 4096 else "xla", (*f32, p, valid)), np.float32)
    out = {impl: np.asarray(run(impl, (q, k, v, g, p, valid)).astype(jnp.float32)) for impl in ("pallas", "xla")}
    scale = np.abs(ref).max()
    for impl, o in out.items():
        err = np.abs(o - ref)
        rows = (err.max(axis=(2, 3)) > 0.05 * scale)
        print(f"N={n} {impl} vs f32 reference: max abs {err.max():.3f} (ref max {scale:.2f}), rel-norm "
              f"{np.linalg.norm(o - ref) / np.linalg.norm(ref):.4f}, query rows off by >5% of max: {int(rows.sum())} of {rows.size}")
    d = np.abs(out["pallas"] - out["xla"]).max(axis=(2, 3))
    print(f"N={n} pallas vs xla: rows differing >0.05: {int((d > 0.05).sum())}, max {d.max():.3f}")
