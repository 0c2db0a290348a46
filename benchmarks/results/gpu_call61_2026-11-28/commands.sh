#!/bin/bash
# call 61 (H200): the compiled-Triton STIS tests (float32 at 1e-5, bf16) with round 11's base-2 softmax and
# head-major K / V
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
L=$OUT/logs; mkdir -p $L
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python -c "import jax, jaxlib, triton; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'triton', triton.__version__)"; date -u; } > $L/device.txt 2>&1
cat $L/device.txt
timeout 150 python -m pytest -q -o addopts="-ra" -p no:cacheprovider tests/test_pallas_stis_gpu.py -k "triton" > $L/pytest.log 2>&1; echo "pytest rc=$?"; tail -4 $L/pytest.log
cd $OUT && tar czf logs.tgz logs && cp logs/device.txt . && rm -rf logs
