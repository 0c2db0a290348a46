#!/bin/bash
# call 34: matmul-score row-wise selection: ncu, tile / chunk / order sweep, layer with the best setting (+ gated kernels at 1k / 4k)
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
L=$OUT/logs; mkdir -p $L
T0=$(date +%s)
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python -c "import jax, jaxlib, triton; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'triton', triton.__version__)"; date -u; } > $L/device.txt 2>&1
ALL=SEL_ROWS_MAX_BLOCKS=2147483647
NCU="ncu --clock-control none -k regex:ltis_select --launch-skip 1 --launch-count 1 --section LaunchStats --section Occupancy --section WarpStateStats --section SpeedOfLight --section SchedulerStats --section InstructionStats --metrics regex:smsp__average_warps_issue_stalled_.*_per_issue_active.ratio,sm__inst_executed_pipe_lsu.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_fma.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_alu.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active,smsp__inst_executed.sum"
for cfg in "ltis_gpu.$ALL" "ltis_gpu.$ALL,ltis_gpu.SEL_ROWS_BLOCK_Q=128,ltis_gpu.SEL_ROWS_NUM_WARPS=4,ltis_gpu.SEL_ROWS_DOT_CHUNK=32"; do
  tag=$(echo $cfg | md5sum | cut -c1-6)
  timeout 90 $NCU python benchmarks/kernels_ltis.py --skip-check --select-only --lengths 32768 --iters 1 --warmup 1 --set $cfg > $L/ncu_$tag.log 2>&1
  echo "ncu $cfg rc=$? t=$(( $(date +%s)-T0 ))"
  grep -E "Profiling|Registers Per|Achieved Occupancy|Theoretical Occ|Duration|Issue Slots Busy|Warp Cycles Per Issued|No Eligible|pipe_|stalled_|inst_executed.sum|Executed Instructions " $L/ncu_$tag.log | grep -v " 0$\| 0.00$" | sed 's/  */ /g' | head -45
done
timeout 230 python benchmarks/kernels_ltis.py --select-only --skip-check --lengths 1024,4096,16384,32768,65536 --iters 20 --sweep \
  "$ALL,SEL_ROWS_DOT_CHUNK=32" "$ALL,SEL_ROWS_DOT_CHUNK=32,SEL_ROWS_DOT_LONGEST_FIRST=1" \
  "$ALL,SEL_ROWS_BLOCK_Q=64,SEL_ROWS_NUM_WARPS=2,SEL_ROWS_DOT_CHUNK=32" "$ALL,SEL_ROWS_BLOCK_Q=64,SEL_ROWS_NUM_WARPS=2,SEL_ROWS_DOT_LONGEST_FIRST=1" \
  "$ALL,SEL_ROWS_BLOCK_Q=128,SEL_ROWS_NUM_WARPS=4,SEL_ROWS_DOT_CHUNK=32" "$ALL,SEL_ROWS_BLOCK_Q=128,SEL_ROWS_NUM_WARPS=4,SEL_ROWS_DOT_LONGEST_FIRST=1" \
  "$ALL,SEL_ROWS_BLOCK_Q=128,SEL_ROWS_NUM_WARPS=4,SEL_ROWS_DOT_CHUNK=64" "$ALL,SEL_ROWS_BLOCK_Q=256,SEL_ROWS_NUM_WARPS=8,SEL_ROWS_DOT_CHUNK=32" \
  "$ALL,SEL_ROWS_BLOCK_Q=128,SEL_ROWS_NUM_WARPS=4,SEL_ROWS_DOT_CHUNK=32,SEL_ROWS_DOT_LONGEST_FIRST=1" > $L/sweep.log 2>&1
echo "sweep rc=$? t=$(( $(date +%s)-T0 ))"
grep '^sweep' $L/sweep.log | python -c "
import sys,json
for line in sys.stdin:
    r=json.loads(line[6:]); print(r['overrides'], r.get('checks_ok'), r.get('error','')[:300], [(t['N'],t['select_ms']) for t in r.get('timings',[])])"
BEST=$(grep '^sweep' $L/sweep.log | python -c "
import sys,json
rows=[json.loads(l[6:]) for l in sys.stdin]
rows=[r for r in rows if r.get('checks_ok') and r.get('timings')]
t=lambda r,n: [x['select_ms'] for x in r['timings'] if x['N']==n][0]
best=min(rows, key=lambda r: t(r,32768)+0.5*t(r,4096)+0.5*t(r,65536))
print(','.join('ltis_gpu.'+kv for kv in best['overrides'].split(',')))")
echo "best: $BEST"
timeout 150 python benchmarks/attention.py --lengths 1024 4096 32768 65536 --impls dense-cudnn blossom-pallas --check-lengths 17 300 1024 --iters 20 --set $BEST --out $OUT/layer_best.json > $L/layer_best.log 2>&1
echo "layer rc=$? t=$(( $(date +%s)-T0 ))"; grep -i "fail" $L/layer_best.log | head -3; tail -9 $L/layer_best.log
timeout 70 python benchmarks/attention.py --skip-check --lengths 1024 4096 --impls dense-cudnn blossom-pallas --iters 20 --set $BEST,gated_gpu.MIN_LEN=1 --out $L/layer_gated.json > $L/layer_gated.log 2>&1
echo "gated rc=$? t=$(( $(date +%s)-T0 ))"; tail -5 $L/layer_gated.log
timeout 80 python benchmarks/attention.py --profile --skip-check --lengths 4096 32768 --impls blossom-pallas --iters 20 --set $BEST --out $L/profile_best.json > $L/profile_best.log 2>&1
echo "profile rc=$? t=$(( $(date +%s)-T0 ))"; grep "^profile" $L/profile_best.log
cd $OUT && cp logs/sweep.log . ; tar czf logs.tgz logs && cp logs/device.txt . && rm -rf logs
