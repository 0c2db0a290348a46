#!/bin/bash
# call 51: blossom_attention called eagerly runs as one jitted program (traced calls unchanged): eager vs jit on the
# H100 (pallas / xla, outputs and gradients); the GPU-only tests (cuDNN, compiled Triton kernels); README block 0;
# the layer benchmark's check + timing at 1k / 4k / 32k against cuDNN (jitted paths: unchanged code)
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
L=$OUT/logs; mkdir -p $L
T0=$(date +%s)
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python -c "import jax, jaxlib, triton; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'triton', triton.__version__)"; date -u; } > $L/device.txt 2>&1
timeout 150 python .devrun/eager_check.py > $L/eager.log 2>&1; echo "eager rc=$? t=$(( $(date +%s)-T0 ))"; cat $L/eager.log | grep -v Warning | tail -15
python -c "import pytest" 2>/dev/null && { timeout 200 python -m pytest -q -o addopts="" -p no:cacheprovider tests/test_dense_attention.py tests/test_pallas_stis_gpu.py -x > $L/pytest.log 2>&1; echo "pytest rc=$? t=$(( $(date +%s)-T0 ))"; tail -5 $L/pytest.log; } || echo "no pytest on this image"
python - > $L/readme.log 2>&1 <<'PY'
import re, time
t = time.perf_counter()
block = re.findall(r"```python\n(.*?)```", open("README.md").read(), flags=re.S)[0]
exec(compile(block, "README block 0", "exec"), {"__name__": "readme"})
print(f"README block 0 ran on the GPU in {time.perf_counter() - t:.1f}s")
PY
echo "readme rc=$? t=$(( $(date +%s)-T0 ))"; tail -2 $L/readme.log
timeout 150 python benchmarks/attention.py --lengths 1024 4096 32768 --impls dense-cudnn blossom-pallas --check-lengths 300 1024 --iters 20 --pipelined --out $OUT/attention.json > $L/attention.log 2>&1
echo "attention rc=$? t=$(( $(date +%s)-T0 ))"; grep '"ok"' $L/attention.log | cut -c1-160; sed -n '/^impl/,$p' $L/attention.log
cd $OUT && tar czf logs.tgz logs && cp logs/device.txt . && rm -rf logs
