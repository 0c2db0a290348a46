#!/bin/bash
# call 57 (H200): K / V head-major inside the LTIS / gated / STIS kernels (working tree) vs the model layout
# (KV_HEAD_MAJOR=0): compiled checks, per-kernel device profile at 1k / 4k / 32k, ncu L1 / L2 of the LTIS kernels at
# 4k, and the timed layer vs cuDNN
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
L=$OUT/logs; mkdir -p $L
T0=$(date +%s)
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python -c "import jax, jaxlib, triton; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'triton', triton.__version__)"; date -u; } > $L/device.txt 2>&1
cat $L/device.txt
OLD="ltis_gpu.KV_HEAD_MAJOR=0,stis_gpu.KV_HEAD_MAJOR=0"
LTISONLY="stis_gpu.KV_HEAD_MAJOR=0"
timeout 150 python benchmarks/attention.py --profile --check-lengths 17 300 1024 4096 8192 --lengths 1024 4096 32768 --impls blossom-pallas --iters 10 --variants default $OLD $LTISONLY --out $L/profile.json > $L/profile.log 2>&1
echo "profile rc=$? t=$(( $(date +%s)-T0 ))"
grep '"ok"' $L/profile.log | python -c "import sys,json; [print(r['N'],r.get('variant'),r['ok'],round(r['out_rel_err'],5),round(r['max_grad_rel_err'],5)) for r in (json.loads(l.split(' ',1)[1]) for l in sys.stdin)]"; grep -i "fail\|Traceback\|Error" $L/profile.log | head -5
python - $L/profile.json.rows.jsonl <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line); p = r.get("fwdbwd_profile", {})
    k = {a.replace("ltis_attention", "L").replace("stis_bwd", "S").replace("gated_attention", "G"): b for a, b in p.get("by_kernel_ms", {}).items()}
    print(r.get("variant"), r["N"], "dev", p.get("device_ms"), "ops", p.get("events_per_call"), json.dumps(k), r.get("error", ""))
PY
export XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_COMPILATION_CACHE_DIR=/tmp/jcache JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=-1
M="l1tex__t_requests_pipe_lsu_mem_global_op_ld.sum,l1tex__t_sectors_pipe_lsu_mem_global_op_ld.sum,lts__t_bytes.sum,smsp__inst_executed.sum"
for N in 4096; do
  XLA_FLAGS=--xla_gpu_enable_command_buffer= timeout 60 python .devrun/ncu_layer.py $N 2>&1 | tail -1
  XLA_FLAGS=--xla_gpu_enable_command_buffer= timeout 150 ncu --launch-skip 7 --clock-control none -k "regex:stis_|ltis_attention" --launch-count 6 \
    --section SpeedOfLight --section Occupancy --metrics $M python .devrun/ncu_layer.py $N > $L/ncu_$N.log 2>&1
  rc=$?; echo "ncu N=$N rc=$rc t=$(( $(date +%s)-T0 ))"; [ $rc != 0 ] && tail -5 $L/ncu_$N.log
  grep -E "^  [a-z_]+.*\(|Registers Per|Achieved Occupancy|^    Duration|L2 Cache Throughput|L1/TEX Cache Throughput|Compute \(SM\)|inst_executed.sum|bytes.sum|sectors|requests" $L/ncu_$N.log | sed 's/  */ /g'
done
unset XLA_PYTHON_CLIENT_PREALLOCATE JAX_COMPILATION_CACHE_DIR
timeout 240 python benchmarks/attention.py --lengths 1024 4096 32768 --impls dense-cudnn blossom-pallas --variants default $OLD --skip-check --iters 20 --pipelined --out $OUT/attention_table.json > $L/table.log 2>&1
echo "table rc=$? t=$(( $(date +%s)-T0 ))"; sed -n '/^impl/,$p' $L/table.log
cd $OUT && tar czf logs.tgz logs && cp logs/device.txt . && rm -rf logs
