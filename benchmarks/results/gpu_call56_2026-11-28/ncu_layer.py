"""One jitted forward+backward of the benchmark layer at N (argv[1]), for ncu."""
import sys, os
sys.path.insert(0, os.path.join(os.getcwd(), "benchmarks"))
import jax
import attention as A
n = int(sys.argv[1]); impl = sys.argv[2] if len(sys.argv) > 2 else "blossom-pallas"
layer = A.make_layer(impl)
params = layer.init(jax.random.key(0))
x, valid, cot = A._inputs(jax.random.key(1), 65536 // n, n, padded=False)
f, g = A.fwd_and_grad(layer)
for _ in range(2):
    out = g(params, x, valid, cot)
    jax.block_until_ready(out)
print("done", n, impl, flush=True)
