#!/bin/bash
# call 60 (H200): the rest of the table for the current code (N = 256 / 8k / 16k / 64k against cuDNN; N = 128k at
# 131,072 tokens, pallas only); checks were done in call 59
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
L=$OUT/logs; mkdir -p $L
T0=$(date +%s)
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python -c "import jax, jaxlib, triton; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'triton', triton.__version__)"; date -u; } > $L/device.txt 2>&1
cat $L/device.txt
timeout 170 python benchmarks/attention.py --lengths 256 8192 16384 65536 --impls dense-cudnn blossom-pallas --skip-check --iters 20 --pipelined --out $OUT/attention_table.json > $L/table.log 2>&1
echo "table rc=$? t=$(( $(date +%s)-T0 ))"; sed -n '/^impl/,$p' $L/table.log
timeout 60 python benchmarks/attention.py --tokens 131072 --lengths 131072 --impls blossom-pallas --skip-check --iters 10 --out $OUT/attention_128k.json > $L/table128k.log 2>&1
echo "128k rc=$? t=$(( $(date +%s)-T0 ))"; sed -n '/^impl/,$p' $L/table128k.log
cd $OUT && tar czf logs.tgz logs && cp logs/device.txt . && rm -rf logs
