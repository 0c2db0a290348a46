#!/bin/bash
# call 33: row-wise selection with matmul scores (SEL_ROWS_DOT): sweep + checks, ncu of the selection kernels, layer
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
L=$OUT/logs; mkdir -p $L
T0=$(date +%s)
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python -c "import jax, jaxlib, triton; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'triton', triton.__version__)"; date -u; } > $L/device.txt 2>&1
ALL=SEL_ROWS_MAX_BLOCKS=2147483647
timeout 200 python benchmarks/kernels_ltis.py --select-only --skip-check --lengths 1024,4096,16384,32768,65536 --iters 20 --sweep \
  "SEL_ROWS_DOT=0" "$ALL" "$ALL,SEL_ROWS_DOT_IEEE=1" "$ALL,SEL_ROWS_DOT_CHUNK=32" "$ALL,SEL_ROWS_BLOCK_Q=64,SEL_ROWS_NUM_WARPS=2" \
  "$ALL,SEL_ROWS_BLOCK_Q=128,SEL_ROWS_NUM_WARPS=4" "$ALL,SEL_ROWS_BLOCK_Q=64" > $L/sweep.log 2>&1
echo "sweep rc=$? t=$(( $(date +%s)-T0 ))"
grep '^sweep' $L/sweep.log | python -c "
import sys,json
for line in sys.stdin:
    r=json.loads(line[6:]); print(r['overrides'], r.get('checks_ok'), r.get('error','')[:400], [(t['N'],t['select_ms']) for t in r.get('timings',[])])"
grep -i "error\|Traceback" $L/sweep.log | head -5
timeout 100 python benchmarks/kernels_ltis.py --check-only --lengths 4096,16384,32768 --set ltis_gpu.$ALL > $L/check_dot.log 2>&1; echo "check rc=$? t=$(( $(date +%s)-T0 ))"
grep -h '"ok"' $L/check_dot.log | python -c "import sys,json; [print(r['name'],r['N'],r['kept_set_mismatch'],r['ok']) for r in map(json.loads,sys.stdin)]" 2>/dev/null | tail -14
NCU="ncu --clock-control none -k regex:_select_(rows|kernel) --launch-skip 1 --launch-count 1 --section LaunchStats --section Occupancy --section WarpStateStats --section SpeedOfLight --section SchedulerStats --section InstructionStats --metrics regex:smsp__average_warps_issue_stalled_.*_per_issue_active.ratio,sm__inst_executed_pipe_lsu.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_fma.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_alu.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active,smsp__inst_executed.sum"
for cfg in "ltis_gpu.$ALL,ltis_gpu.SEL_ROWS_DOT=0" "ltis_gpu.$ALL" "ltis_gpu.SEL_ROWS_MAX_BLOCKS=-1"; do
  tag=$(echo $cfg | md5sum | cut -c1-6)
  timeout 90 $NCU python benchmarks/kernels_ltis.py --skip-check --select-only --lengths 32768 --iters 1 --warmup 1 --set $cfg > $L/ncu_$tag.log 2>&1
  echo "ncu $cfg rc=$? t=$(( $(date +%s)-T0 ))"
  grep -E "Profiling|Registers Per|Achieved Occupancy|Duration|Issue Slots Busy|Warp Cycles Per Issued|No Eligible|pipe_|stalled_(long|short|wait|math|lg|mio|not_sel|selected|no_inst|branch|barrier|dispatch|tex|drain|imc|sleep|membar)|inst_executed.sum|Executed Instructions " $L/ncu_$tag.log | sed 's/  */ /g' | head -40
done
timeout 150 python benchmarks/attention.py --lengths 1024 4096 32768 --impls dense-cudnn blossom-pallas --check-lengths 17 300 1024 --iters 20 --out $OUT/layer_dot.json > $L/layer_dot.log 2>&1
echo "layer rc=$? t=$(( $(date +%s)-T0 ))"; grep -i "fail" $L/layer_dot.log | head -3; tail -8 $L/layer_dot.log
timeout 90 python benchmarks/attention.py --profile --skip-check --lengths 1024 4096 32768 --impls blossom-pallas --iters 20 --out $L/profile_dot.json > $L/profile_dot.log 2>&1
echo "profile rc=$? t=$(( $(date +%s)-T0 ))"; grep "^profile" $L/profile_dot.log
cd $OUT && cp logs/sweep.log . ; tar czf logs.tgz logs && cp logs/device.txt . && rm -rf logs
