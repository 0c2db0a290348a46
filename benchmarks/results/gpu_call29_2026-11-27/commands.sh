#!/bin/bash
# call 29: ncu of the two selection kernels at 32k; selection sweep (longest-first grids, interleaved lists)
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
L=$OUT/logs; mkdir -p $L
T0=$(date +%s)
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python -c "import jax, jaxlib, triton; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'triton', triton.__version__)"; date -u; } > $L/device.txt 2>&1
NCU="ncu --clock-control none -k regex:select --launch-skip 1 --launch-count 1 --section LaunchStats --section Occupancy --section WarpStateStats --section SpeedOfLight --section ComputeWorkloadAnalysis --section SchedulerStats"
for cfg in "ltis_gpu.SEL_ROWS_MIN_BLOCKS=2147483647" "ltis_gpu.SEL_ROWS_MIN_BLOCKS=0,ltis_gpu.SEL_ROWS_BLOCK_Q=32,ltis_gpu.SEL_ROWS_NUM_WARPS=1"; do
  tag=$(echo $cfg | md5sum | cut -c1-6)
  timeout 100 $NCU python benchmarks/kernels_ltis.py --skip-check --select-only --lengths 32768 --iters 1 --warmup 1 --set $cfg > $L/ncu_$tag.log 2>&1
  echo "ncu $cfg rc=$? t=$(( $(date +%s)-T0 ))"
  grep -E "Registers Per|Achieved Occupancy|Theoretical Occupancy|Duration|Issue Slots Busy|Executed Ipc Active|Warp Cycles Per Issued|No Eligible|Block Limit|Compute \(SM\) Throughput|Memory Throughput|One or More Eligible" $L/ncu_$tag.log | head -20
done
SW="SEL_ROWS_MIN_BLOCKS=0,SEL_ROWS_BLOCK_Q=32,SEL_ROWS_NUM_WARPS=1"
timeout 260 python benchmarks/kernels_ltis.py --skip-check --select-only --lengths 1024,4096,32768,65536 --iters 20 --sweep \
  "SEL_LONGEST_FIRST=1" "$SW" "$SW,SEL_LONGEST_FIRST=1" "$SW,SEL_ROWS_LISTS=2" "$SW,SEL_ROWS_LISTS=2,SEL_LONGEST_FIRST=1" \
  "SEL_ROWS_MIN_BLOCKS=0,SEL_ROWS_LISTS=2,SEL_LONGEST_FIRST=1" "SEL_ROWS_MIN_BLOCKS=0,SEL_ROWS_BLOCK_Q=64,SEL_ROWS_NUM_WARPS=2,SEL_ROWS_LISTS=2,SEL_LONGEST_FIRST=1" > $L/sweep.log 2>&1
echo "sweep rc=$? t=$(( $(date +%s)-T0 ))"
grep '^sweep' $L/sweep.log | python -c "
import sys,json
for line in sys.stdin:
    r=json.loads(line[6:]); print(r['overrides'], r.get('checks_ok'), r.get('error','')[:300], [(t['N'],t['select_ms'],t['select_min_ms']) for t in r.get('timings',[])])"
cd $OUT && cp logs/sweep.log . ; tar czf logs.tgz logs && cp logs/device.txt . && rm -rf logs
