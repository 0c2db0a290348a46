#!/bin/bash
# call 56 (H200): ncu counters of the six attention kernels of the layer (fwd+bwd) at N = 1k and 4k, to see
# what bounds each (occupancy, stalls, L2 / L1 throughput, uncoalesced accesses)
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_COMPILATION_CACHE_DIR=/tmp/jcache JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=-1
L=$OUT/logs; mkdir -p $L
T0=$(date +%s)
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python -c "import jax, jaxlib, triton; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'triton', triton.__version__)"; date -u; } > $L/device.txt 2>&1
cat $L/device.txt
M="regex:smsp__average_warps_issue_stalled_.*_per_issue_active.ratio,sm__inst_executed_pipe_lsu.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_fma.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_alu.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active,smsp__inst_executed.sum,lts__t_bytes.sum,l1tex__t_bytes.sum,lts__t_sectors_srcunit_tex_op_read.sum,l1tex__t_requests_pipe_lsu_mem_global_op_ld.sum,l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum,l1tex__t_sector_hit_rate.pct,lts__t_sector_hit_rate.pct,dram__bytes.sum,sm__warps_active.avg.pct_of_peak_sustained_active"
for N in 1024 4096; do XLA_FLAGS=--xla_gpu_enable_command_buffer= timeout 60 python -X faulthandler .devrun/ncu_layer.py $N 2>&1 | tail -3; done; ls /tmp/jcache | head
for N in 1024 4096; do
  XLA_FLAGS=--xla_gpu_enable_command_buffer= timeout 200 ncu --launch-skip 7 --clock-control none -k "regex:stis_|ltis_attention|ltis_select" --launch-count 7 \
    --section LaunchStats --section Occupancy --section WarpStateStats --section SpeedOfLight --section SchedulerStats --section MemoryWorkloadAnalysis \
    --metrics $M python -X faulthandler .devrun/ncu_layer.py $N > $L/ncu_$N.log 2>&1
  rc=$?; echo "ncu N=$N rc=$rc t=$(( $(date +%s)-T0 ))"; [ $rc != 0 ] && tail -25 $L/ncu_$N.log
  grep -E "^  [a-z_]+.*\(|Registers Per|Achieved Occupancy|Theoretical Occ|Block Limit|^    Duration|Issue Slots Busy|Warp Cycles Per Issued|No Eligible|Memory Throughput|L2 Cache Throughput|L1/TEX Cache Throughput|DRAM Throughput|Compute \(SM\)|pipe_|stalled_|inst_executed.sum|bytes.sum|sectors|requests|hit_rate|warps_active|uncoalesc|Uncoalesc" $L/ncu_$N.log | grep -v " 0$\| 0.00$\| 0.0[0-9]$" | sed 's/  */ /g' | head -400
done
cd $OUT && tar czf logs.tgz logs && cp logs/device.txt . && rm -rf logs
