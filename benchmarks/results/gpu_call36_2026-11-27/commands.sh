#!/bin/bash
# call 36: final defaults (one selection kernel, matmul scores, 128 x 4 x 32): kept-set checks, layer table with latency and throughput, profile, 131k tokens
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
L=$OUT/logs; mkdir -p $L
T0=$(date +%s)
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python -c "import jax, jaxlib, triton; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'triton', triton.__version__)"; date -u; } > $L/device.txt 2>&1
timeout 130 python benchmarks/kernels_ltis.py --check-only --lengths 1024,4096,32768,65536 > $L/check.log 2>&1; echo "check rc=$? t=$(( $(date +%s)-T0 ))"
grep -h '"ok"' $L/check.log | python -c "import sys,json; [print(r['name'],r['N'],r['kept_set_mismatch'],r['ok']) for r in map(json.loads,sys.stdin)]" 2>/dev/null | tail -14
timeout 290 python benchmarks/attention.py --lengths 256 1024 4096 8192 16384 32768 65536 --impls dense-cudnn blossom-pallas --check-lengths 17 300 1024 4096 --iters 20 --pipelined --out $OUT/attention_table.json > $L/table.log 2>&1
echo "table rc=$? t=$(( $(date +%s)-T0 ))"; grep -i "fail" $L/table.log | head -3; tail -20 $L/table.log
timeout 80 python benchmarks/attention.py --profile --skip-check --lengths 1024 4096 32768 --impls blossom-pallas --iters 20 --out $L/profile.json > $L/profile.log 2>&1
echo "profile rc=$? t=$(( $(date +%s)-T0 ))"; grep "^profile" $L/profile.log
timeout 60 python benchmarks/attention.py --skip-check --tokens 131072 --lengths 65536 131072 --impls dense-cudnn blossom-pallas --iters 10 --pipelined --out $L/tokens131k.json > $L/tokens131k.log 2>&1
echo "131k rc=$? t=$(( $(date +%s)-T0 ))"; tail -8 $L/tokens131k.log
cd $OUT && tar czf logs.tgz logs && cp logs/device.txt . && rm -rf logs
