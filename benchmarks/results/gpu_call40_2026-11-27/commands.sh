#!/bin/bash
# call 40: STIS tile sizes (rows per program of the forward / dq and of the dk/dv kernel, warps) as variants in one
# process at 1k / 4k (separate kernels): checks, device profile, latency / throughput
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
L=$OUT/logs; mkdir -p $L
T0=$(date +%s)
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python -c "import jax, jaxlib, triton; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'triton', triton.__version__)"; date -u; } > $L/device.txt 2>&1
V="default stis_gpu.DEFAULT_ROWS_PER_PROGRAM=512 stis_gpu.DEFAULT_ROWS_PER_PROGRAM=128 stis_gpu.DEFAULT_ROWS_PER_PROGRAM_DKV=256 stis_gpu.DEFAULT_ROWS_PER_PROGRAM_DKV=64 stis_gpu.NUM_WARPS=8,stis_gpu.DEFAULT_ROWS_PER_PROGRAM=512,stis_gpu.DEFAULT_ROWS_PER_PROGRAM_DKV=256"
timeout 260 python benchmarks/attention.py --profile --check-lengths 300 1024 --lengths 1024 4096 --impls blossom-pallas --variants $V --iters 10 --out $L/profile.json > $L/profile.log 2>&1
echo "profile rc=$? t=$(( $(date +%s)-T0 ))"; grep '"ok"' $L/profile.log | python -c "import sys,json; [print(r.get('variant'),r['N'],r['ok'],round(r['out_rel_err'],5),round(r['max_grad_rel_err'],5)) for r in (json.loads(l.split(' ',1)[1]) for l in sys.stdin)]"; grep "^profile" $L/profile.log | sed 's/ltis_attention/L/g; s/stis_bwd/S/g'
timeout 200 python benchmarks/attention.py --skip-check --lengths 1024 4096 --impls dense-cudnn blossom-pallas --variants $V --iters 30 --pipelined --out $OUT/attention_table.json > $L/table.log 2>&1
echo "table rc=$? t=$(( $(date +%s)-T0 ))"; sed -n '/fwdbwd_pipelined_ms/,$p' $L/table.log
cd $OUT && tar czf logs.tgz logs && cp logs/device.txt . && rm -rf logs
