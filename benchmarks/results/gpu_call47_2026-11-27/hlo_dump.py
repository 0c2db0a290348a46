"""Optimized HLO of the blossom-pallas layer's forward+backward at one length (for reading XLA's fusions)."""
import os, sys
import jax
sys.path.insert(0, "benchmarks")
import attention as A

n = int(sys.argv[1]); out = sys.argv[2]
layer = A.make_layer("blossom-pallas")
params = layer.init(jax.random.key(0))
x, valid, cot = A._inputs(jax.random.key(1), 65536 // n, n, padded=True)
_, g = A.fwd_and_grad(layer)
text = g.lower(params, x, valid, cot).compile().as_text()
open(out, "w").write(text)
print("hlo", n, len(text.splitlines()), "lines")
