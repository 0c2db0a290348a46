#!/bin/bash
# call 32: the final commit's defaults, timed layer at 1k / 4k / 8k / 32k in one process
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python -c "import jax, jaxlib, triton; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'triton', triton.__version__)"; date -u; } > $OUT/device.txt 2>&1
timeout 140 python benchmarks/attention.py --skip-check --lengths 1024 4096 8192 32768 --impls dense-cudnn blossom-pallas --iters 20 --out $OUT/attention_final.json > $OUT/final.log 2>&1
echo "rc=$?"; tail -10 $OUT/final.log
