#!/bin/bash
# call 38: segment starts by first-position scatter + reverse cummin (replacing the scatter-add of counts):
# device profile against HEAD (68c39f3, in .devrun/base) on the same card; gated kernels from N = 257 against the
# default, alternated three times in one process (latency and throughput)
export PYTHONUNBUFFERED=1
L=$OUT/logs; mkdir -p $L
T0=$(date +%s)
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python -c "import jax, jaxlib, triton; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'triton', triton.__version__)"; date -u; } > $L/device.txt 2>&1
(cd .devrun/base && PYTHONPATH=$PWD timeout 120 python benchmarks/attention.py --profile --skip-check --lengths 1024 4096 32768 --impls blossom-pallas --iters 10 --out $L/profile_base.json > $L/profile_base.log 2>&1); echo "base rc=$? t=$(( $(date +%s)-T0 ))"; grep "^profile" $L/profile_base.log
export PYTHONPATH=$PWD
timeout 200 python benchmarks/attention.py --profile --check-lengths 17 300 1024 4096 --lengths 1024 4096 32768 --impls blossom-pallas --variants default gated_gpu.MIN_LEN=1 --iters 10 --out $L/profile.json > $L/profile.log 2>&1
echo "profile rc=$? t=$(( $(date +%s)-T0 ))"; grep '"ok"' $L/profile.log | python -c "import sys,json; [print(r['impl'],r.get('variant'),r['N'],r['ok'],round(r['out_rel_err'],5),round(r['max_grad_rel_err'],5)) for r in (json.loads(l.split(' ',1)[1]) for l in sys.stdin)]"; grep "^profile\|FAIL" $L/profile.log
V="default gated_gpu.MIN_LEN=1"
timeout 230 python benchmarks/attention.py --skip-check --lengths 1024 4096 --impls dense-cudnn blossom-pallas --variants $V $V $V --iters 50 --pipelined --out $L/ab.json > $L/ab.log 2>&1
echo "ab rc=$? t=$(( $(date +%s)-T0 ))"; sed -n '/^impl/,$p' $L/ab.log
cd $OUT && tar czf logs.tgz logs && cp logs/device.txt . && rm -rf logs
