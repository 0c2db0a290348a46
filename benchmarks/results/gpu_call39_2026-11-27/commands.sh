#!/bin/bash
# call 39: committed candidate (segment starts by first-position scatter) with the selection's query tiles launched in
# order (default) and longest first (ltis_gpu.SEL_LONGEST_FIRST=1), in one process: layer checks, latency / throughput
# table at 256 .. 64k, device profile, 131,072 tokens
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
L=$OUT/logs; mkdir -p $L
T0=$(date +%s)
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python -c "import jax, jaxlib, triton; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'triton', triton.__version__)"; date -u; } > $L/device.txt 2>&1
V="default ltis_gpu.SEL_LONGEST_FIRST=1"
timeout 330 python benchmarks/attention.py --lengths 256 1024 4096 8192 16384 32768 65536 --impls dense-cudnn blossom-pallas --variants $V --check-lengths 17 300 1024 4096 --iters 20 --pipelined --out $OUT/attention_table.json > $L/table.log 2>&1
echo "table rc=$? t=$(( $(date +%s)-T0 ))"; grep '"ok"' $L/table.log | python -c "import sys,json; [print(r['impl'],r.get('variant'),r['N'],r['ok'],round(r['out_rel_err'],5),round(r['max_grad_rel_err'],5)) for r in (json.loads(l.split(' ',1)[1]) for l in sys.stdin)]"; grep -i "fail" $L/table.log | head -3; sed -n '/^impl/,$p' $L/table.log
timeout 110 python benchmarks/attention.py --profile --skip-check --lengths 1024 4096 32768 65536 --impls blossom-pallas --variants $V --iters 10 --out $L/profile.json > $L/profile.log 2>&1
echo "profile rc=$? t=$(( $(date +%s)-T0 ))"; grep "^profile" $L/profile.log
timeout 90 python benchmarks/attention.py --skip-check --tokens 131072 --lengths 65536 131072 --impls dense-cudnn blossom-pallas --variants $V --iters 10 --pipelined --out $L/tokens131k.json > $L/tokens131k.log 2>&1
echo "131k rc=$? t=$(( $(date +%s)-T0 ))"; sed -n '/^impl/,$p' $L/tokens131k.log
cd $OUT && tar czf logs.tgz logs && cp logs/device.txt . && rm -rf logs
