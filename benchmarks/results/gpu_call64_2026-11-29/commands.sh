#!/bin/bash
# call 64 (H200): the table rows the round-12 change touches (gated kernels, N >= 8,192) for the committed code:
# checks at 300 / 8k, then the timed layer against cuDNN at 8k / 16k / 32k / 64k
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
L=$OUT/logs; mkdir -p $L
T0=$(date +%s)
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python -c "import jax, jaxlib, triton; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'triton', triton.__version__)"; date -u; git log -1 --format=%h 2>/dev/null; } > $L/device.txt 2>&1
cat $L/device.txt
timeout 420 python benchmarks/attention.py --check-lengths 300 8192 --lengths 8192 16384 32768 65536 --impls dense-cudnn blossom-pallas --iters 20 --pipelined --out $OUT/attention_table.json > $L/table.log 2>&1
echo "table rc=$? t=$(( $(date +%s)-T0 ))"
grep '"ok"' $L/table.log | python -c "import sys,json; [print(r['N'],r['ok'],round(r['out_rel_err'],5),round(r['max_grad_rel_err'],5)) for r in (json.loads(l.split(' ',1)[1]) for l in sys.stdin)]"
sed -n '/^impl/,$p' $L/table.log
cd $OUT && tar czf logs.tgz logs && cp logs/device.txt . && rm -rf logs
