#!/bin/bash
# call 37: latency anatomy (device span vs host wall per synchronised call) for cuDNN and pallas, dispatch floor,
# and the gated kernel set from N = 257 (gated_gpu.MIN_LEN=1) against the default (8192) at 1k / 4k, in one process
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
L=$OUT/logs; mkdir -p $L
T0=$(date +%s)
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python -c "import jax, jaxlib, triton; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'triton', triton.__version__)"; date -u; } > $L/device.txt 2>&1
timeout 60 python benchmarks/dispatch_floor.py --out $L/dispatch_floor.json > $L/floor.log 2>&1; echo "floor rc=$? t=$(( $(date +%s)-T0 ))"; grep floor $L/floor.log
timeout 230 python benchmarks/attention.py --profile --check-lengths 300 1024 4096 --lengths 1024 4096 32768 --impls dense-cudnn blossom-pallas --variants default gated_gpu.MIN_LEN=1 --iters 20 --keep-trace $L/traces --out $L/profile.json > $L/profile.log 2>&1
echo "profile rc=$? t=$(( $(date +%s)-T0 ))"; grep '"ok"' $L/profile.log | python -c "import sys,json; [print(r['impl'],r.get('variant'),r['N'],r['ok'],round(r['out_rel_err'],5),round(r['max_grad_rel_err'],5)) for r in (json.loads(l.split(' ',1)[1]) for l in sys.stdin)]"; grep "^profile\|FAIL" $L/profile.log
timeout 200 python benchmarks/attention.py --skip-check --lengths 1024 4096 32768 --impls dense-cudnn blossom-pallas --variants default gated_gpu.MIN_LEN=1 --iters 30 --pipelined --out $L/table.json > $L/table.log 2>&1
echo "table rc=$? t=$(( $(date +%s)-T0 ))"; tail -22 $L/table.log
cd $OUT && tar czf logs.tgz logs && cp logs/device.txt . && rm -rf logs
