#!/bin/bash
# call 28: row-wise selection kernel: correctness at benchmark shapes, selection sweep, layer A/B
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
L=$OUT/logs; mkdir -p $L
T0=$(date +%s)
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python -c "import jax, jaxlib, triton; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'triton', triton.__version__)"; date -u; } > $L/device.txt 2>&1
timeout 140 python benchmarks/kernels_ltis.py --check-only --lengths 4096,32768,65536 --set ltis_gpu.SEL_ROWS_MIN_BLOCKS=0 > $L/check_rows.log 2>&1; echo "rc=$? t=$(( $(date +%s)-T0 ))" | tee -a $L/check_rows.log
grep -h '"ok"' $L/check_rows.log | python -c "import sys,json; [print(r['name'],r['N'],r['kept_set_mismatch'],r['ok']) for r in map(json.loads,sys.stdin)]" 2>/dev/null | tail -20
timeout 230 python benchmarks/kernels_ltis.py --skip-check --select-only --lengths 1024,4096,32768,65536 --iters 20 --sweep \
  "SEL_ROWS_MIN_BLOCKS=0" "SEL_ROWS_MIN_BLOCKS=0,SEL_ROWS_BLOCK_Q=64,SEL_ROWS_NUM_WARPS=2" \
  "SEL_ROWS_MIN_BLOCKS=0,SEL_ROWS_BLOCK_Q=32,SEL_ROWS_NUM_WARPS=1" "SEL_ROWS_MIN_BLOCKS=0,SEL_ROWS_BLOCK_Q=256,SEL_ROWS_NUM_WARPS=4" \
  "SEL_ROWS_MIN_BLOCKS=0,SEL_ROWS_CHUNK=16" "SEL_ROWS_MIN_BLOCKS=0,SEL_ROWS_CHUNK=4" > $L/sweep.log 2>&1
echo "sweep rc=$? t=$(( $(date +%s)-T0 ))"
grep '^sweep' $L/sweep.log | python -c "
import sys,json
for line in sys.stdin:
    r=json.loads(line[6:]); print(r['overrides'], r.get('checks_ok'), r.get('error','')[:200], [(t['N'],t['select_ms']) for t in r.get('timings',[])])"
timeout 100 python benchmarks/attention.py --skip-check --lengths 1024 4096 32768 65536 --impls dense-cudnn blossom-pallas --iters 20 --out $L/layer_default.json > $L/layer_default.log 2>&1
echo "layer default rc=$? t=$(( $(date +%s)-T0 ))"; tail -10 $L/layer_default.log
timeout 80 python benchmarks/attention.py --skip-check --lengths 1024 4096 32768 65536 --impls blossom-pallas --iters 20 --set ltis_gpu.SEL_ROWS_MIN_BLOCKS=0 --out $L/layer_rows.json > $L/layer_rows.log 2>&1
echo "layer rows rc=$? t=$(( $(date +%s)-T0 ))"; tail -8 $L/layer_rows.log
cd $OUT && tar czf logs.tgz logs && cp logs/device.txt . && rm -rf logs
