#!/bin/bash
# call 35: matmul-score selection, remaining tile configs; layer with command buffers default / off and pipelined, same process
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
L=$OUT/logs; mkdir -p $L
T0=$(date +%s)
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python -c "import jax, jaxlib, triton; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'triton', triton.__version__)"; date -u; } > $L/device.txt 2>&1
ALL=SEL_ROWS_MAX_BLOCKS=2147483647
B128="$ALL,SEL_ROWS_BLOCK_Q=128,SEL_ROWS_NUM_WARPS=4"
timeout 170 python benchmarks/kernels_ltis.py --select-only --skip-check --lengths 1024,4096,32768,65536 --iters 20 --sweep \
  "$B128,SEL_ROWS_DOT_CHUNK=32" "$B128,SEL_ROWS_DOT_CHUNK=64" "$ALL,SEL_ROWS_BLOCK_Q=256,SEL_ROWS_NUM_WARPS=8,SEL_ROWS_DOT_CHUNK=32" \
  "$B128,SEL_ROWS_DOT_CHUNK=32,SEL_ROWS_DOT_LONGEST_FIRST=1" "$ALL,SEL_ROWS_BLOCK_Q=64,SEL_ROWS_NUM_WARPS=2,SEL_ROWS_DOT_CHUNK=32,SEL_ROWS_DOT_LONGEST_FIRST=1" > $L/sweep.log 2>&1
echo "sweep rc=$? t=$(( $(date +%s)-T0 ))"
grep '^sweep' $L/sweep.log | python -c "
import sys,json
for line in sys.stdin:
    r=json.loads(line[6:]); print(r['overrides'], r.get('checks_ok'), r.get('error','')[:300], [(t['N'],t['select_ms']) for t in r.get('timings',[])])"
SET=ltis_gpu.SEL_ROWS_MAX_BLOCKS=2147483647,ltis_gpu.SEL_ROWS_BLOCK_Q=128,ltis_gpu.SEL_ROWS_NUM_WARPS=4,ltis_gpu.SEL_ROWS_DOT_CHUNK=32
timeout 300 python benchmarks/attention.py --lengths 1024 4096 32768 65536 --impls dense-cudnn blossom-pallas --check-lengths 17 300 1024 --iters 30 --set $SET --command-buffers default off --pipelined --out $OUT/layer_cb.json > $L/layer_cb.log 2>&1
echo "layer rc=$? t=$(( $(date +%s)-T0 ))"; grep -i "fail" $L/layer_cb.log | head -3; tail -20 $L/layer_cb.log
cd $OUT && cp logs/sweep.log . ; tar czf logs.tgz logs && cp logs/device.txt . && rm -rf logs
